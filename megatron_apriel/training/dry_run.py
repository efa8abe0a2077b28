"""``apriel train --dry-run CONFIG [--nodes N --gpus-per-node G]``: a config proven at its real layout, without GPUs.

What the first GPU hours of a 15B run would otherwise find out: the run plan
(:func:`megatron_apriel.training.plan.make_plan`, the very checks ``apriel train`` makes before it
starts: heads, query groups, FFN and layers against TP/PP/VPP/CP; sequence length against SP and
CP; batch and micro-batches against DP and the pipeline schedule; data paths and the blend's budget
against the tokens on disk; load/save paths; the SLURM geometry), then, for every distinct rank
position of the layout (first, middle and last pipeline stage with all their virtual stages), the
model that rank builds. It is megatron-core's own model: torch's ``fake`` process-group backend
gives one process a rank of the real world size, ``parallel_state.initialize_model_parallel`` makes
the real TP/PP/CP/DP groups from it, and the chunks are built on the meta device (no memory, no
initialisation). From the built modules it prints parameters per rank, the training memory per GPU
(bf16 weights, fp32 main grads, Adam state sharded over DP by the distributed optimizer, and the
activation estimate of :mod:`megatron_apriel.models.info`, 1F1B: stage i keeps pp - i micro-batches in
flight; the vision encoder's activations, a few hundred patches per image, are left out) and the
FLOPs of a step.

One departure from a real run, without effect on the figures: the model is built with
megatron-core's local layer spec (Transformer Engine is GPU-only), so context parallelism is off in
the layers while building (the local spec's attention has no CP; CP changes no parameter shape; the
parallel groups are the real ones and the activation estimate counts it). Exit 0, or 2 with one
line naming the key at fault.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

# importing fake_pg registers torch's "fake" backend (collectives return at once, no peers needed);
# torch keeps it under testing/_internal and uses it to run distributed code at any world size
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_apriel.models import float8
from megatron_apriel.models.flops import PEAK_BF16_FLOPS, flops_per_token
from megatron_apriel.models.info import GiB, activation_bytes, human_count
from megatron_apriel.models.presets import ModelPreset, padded_vocab_size
from megatron_apriel.runtime import cpu_backend
from megatron_apriel.training.config import TrainConfig
from megatron_apriel.training.freeze import freeze_groups
from megatron_apriel.training.plan import Layout, RunPlan, make_plan

ASSUMED_MFU = 0.4


def rank_positions(layout: Layout) -> list[tuple[str, int]]:
    """Global ranks of the distinct positions: first, middle and last pipeline stage (TP, CP, DP rank 0).

    megatron-core's default order is tp-cp-ep-dp-pp: the pipeline stage of a rank is
    ``rank // (tp * cp * dp)``. Ranks that differ only in TP/CP/DP rank build the same shapes.
    """
    per_stage = layout.tp * layout.cp * layout.dp
    stages = sorted({0, layout.pp // 2, layout.pp - 1})
    names = {0: "first", layout.pp - 1: "last"}
    return [(("only" if layout.pp == 1 else names.get(s, "middle")) + f" stage {s}", s * per_stage) for s in stages]


def build_rank(plan: RunPlan, rank: int) -> dict:
    """Build the chunks of one rank on the meta device over a fake process group of the real world size."""
    cpu_backend.activate(force=True)  # nothing runs: the shim only answers megatron-core's CUDA queries
    m, t, layout = plan.cfg.model, plan.cfg.train, plan.layout
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world)
    try:
        ps.initialize_model_parallel(m.tp, m.pp, virtual_pipeline_model_parallel_size=m.vpp if layout.vpp > 1 else None,
                                     context_parallel_size=m.cp, create_gloo_process_groups=False)
        # the plan's config on the local spec: cp=1 (its attention has no CP, and CP changes no
        # shape), no TE FP8 and no fusions (both GPU-only, neither changes a shape), no initialisation;
        # the float8 linears of a torchao recipe are built (model.fp8_bf16_* decide which layers)
        tcfg = plan.transformer_config(cp=1, device="cpu", use_te=False, fp8=None, torch_fusions=(),
                                       perform_initialization=False)
        with torch.device("meta"):
            chunks = plan.family.build_chunks(plan.preset, tcfg, False, max_sequence_length=max(t.seq_length, 4096),
                                              **plan.fp8_build_args(tcfg))
        freeze_groups(chunks, t.freeze)  # the plan checked the groups against the family
        chunk_rows = []
        for chunk in chunks:
            decoder = getattr(chunk, "language_model", chunk).decoder
            chunk_rows.append(dict(layers=len(decoder.layers),
                                   params=sum(p.numel() for p in chunk.parameters()),
                                   trainable=sum(p.numel() for p in chunk.parameters() if p.requires_grad),
                                   float8_linears=sum(hasattr(mod, "float8_recipe") for mod in chunk.modules())))
        return dict(rank=rank, pp_rank=ps.get_pipeline_model_parallel_rank(),
                    tp_rank=ps.get_tensor_model_parallel_rank(), dp=ps.get_data_parallel_world_size(),
                    chunks=chunk_rows, first=ps.is_pipeline_first_stage(ignore_virtual=True),
                    last=ps.is_pipeline_last_stage(ignore_virtual=True))
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def rank_memory(cfg: TrainConfig, preset: ModelPreset, layout: Layout, built: dict, n_mb: int) -> dict:
    """Bytes per GPU of one rank from its built parameter counts (see module docstring)."""
    m, t = cfg.model, cfg.train
    params = sum(c["params"] for c in built["chunks"])
    trainable = sum(c["trainable"] for c in built["chunks"])
    layers = sum(c["layers"] for c in built["chunks"])
    shards = layout.dp * layout.cp if t.optim.use_distributed_optimizer else 1
    weights = (2 if m.bf16 else 4) * params
    grads = 4 * trainable
    optim = (12 if m.bf16 else 8) * trainable / shards  # fp32 master (bf16 only) + Adam m and v
    in_flight = min(layout.pp - built["pp_rank"], n_mb) if layout.pp > 1 else 1
    act = activation_bytes(preset, t.seq_length // layout.cp, t.micro_batch_size, m.tp, m.sequence_parallel,
                           m.recompute) * layers * in_flight
    if built["last"]:
        vocab = padded_vocab_size(preset.vocab_size, m.tp)
        act += 2 * 4 * t.seq_length // layout.cp * t.micro_batch_size * vocab / m.tp
    return dict(params=params, trainable=trainable, layers=layers, weights=weights, grads=grads, optimizer=optim,
                activations=act, total=weights + grads + optim + act)


def _bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def dry_run(cfg: TrainConfig, nodes: int | None = None, gpus_per_node: int | None = None, files: bool = True,
            gpu_memory_gib: float = 80.0, out=print) -> dict:
    """Make the run plan (every check the real run makes), build every rank position; prints the report."""
    plan = make_plan(cfg, nodes=nodes, gpus_per_node=gpus_per_node, files=files, device="cuda")
    preset, layout, n_mb, notes = plan.preset, plan.layout, plan.microbatches, plan.notes
    m, t = cfg.model, cfg.train
    vp = f" x VPP {layout.vpp}" if layout.vpp > 1 else ""
    out(f"dry run of {preset.name} at TP {m.tp} x PP {m.pp}{vp} x CP {m.cp} x DP {layout.dp} = {layout.world} GPUs "
        f"({layout.nodes} nodes x {layout.gpus_per_node}; sbatch --nodes={layout.nodes} --gpus-per-node="
        f"{layout.gpus_per_node} --ntasks-per-node={layout.gpus_per_node}), sequence parallel "
        f"{'on' if m.sequence_parallel and m.tp > 1 else 'off'}")
    out(f"batch: {t.global_batch_size} x {t.seq_length} tokens = {n_mb} micro-batches of {t.micro_batch_size} "
        f"per DP rank; vocabulary {preset.vocab_size} padded to {padded_vocab_size(preset.vocab_size, m.tp)}")
    for line in (plan.data_lines if files else ["data and checkpoint paths not checked (--no-files)"]):
        out(line)
    for note in notes:
        out(f"note: {note}")
    rows = []
    for position, rank in rank_positions(layout):
        built = build_rank(plan, rank)
        # megatron-core's groups agree with the positions chosen here
        assert (built["dp"], built["pp_rank"]) == (layout.dp, rank // (layout.tp * layout.cp * layout.dp)), built
        rows.append(dict(position=position, rank=rank, chunks=built["chunks"],
                         **rank_memory(cfg, preset, layout, built, n_mb)))
    total = preset.param_counts()["total"]
    if float8.torchao_recipe(plan.fp8):
        # torchao's recipes save the bf16 input and weight for the backward pass and cast them again
        # there, so the float8 copies live only through one GEMM: the estimate is the bf16 one
        n = sum(c["float8_linears"] for r in rows for c in r["chunks"])
        out(f"float8 ({plan.fp8}): {n} linears in float8 in the rank positions below; memory as bf16 (the float8 "
            f"copies of a linear's operands are transient)")
    out("| rank | position | layers | parameters | trainable | weights | grads | optimizer | activations | total |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        layers = "+".join(str(c["layers"]) for c in r["chunks"])
        out(f"| {r['rank']} | {r['position']} | {layers} | {human_count(r['params'], 3)} | "
            f"{human_count(r['trainable'], 3)} | "
            + " | ".join(_bytes(r[k]) for k in ("weights", "grads", "optimizer", "activations", "total")) + " |")
    worst = max(rows, key=lambda r: r["total"])
    if worst["total"] > gpu_memory_gib * GiB:
        out(f"warning: rank {worst['rank']} needs about {_bytes(worst['total'])}, more than the {gpu_memory_gib:g} GiB "
            "of a GPU: turn on model.sequence_parallel, model.recompute: full, or raise model.tp / model.pp")
    flops = flops_per_token(preset, t.seq_length) * t.seq_length * t.global_batch_size
    seconds = flops / (layout.world * PEAK_BF16_FLOPS["H100"] * ASSUMED_MFU)
    out(f"FLOPs per step {flops / 1e15:,.1f} PFLOP ({flops / layout.world / 1e12:,.1f} TFLOP per GPU); at "
        f"{ASSUMED_MFU:.0%} MFU on H100s {seconds:.1f} s per step, {seconds * t.train_iters / 86400:.1f} days for "
        f"{t.train_iters} iterations")
    return dict(layout=layout, microbatches=n_mb, rows=rows, flops_per_step=flops, model_params=total)
