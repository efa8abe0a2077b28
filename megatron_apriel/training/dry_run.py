"""``apriel train --dry-run CONFIG [--nodes N --gpus-per-node G]``: a config proven at its real layout, without GPUs.

What the first GPU hours of a 15B run would otherwise find out: every check training makes on the
config (heads, query groups, FFN and layers against TP/PP/VPP/CP; sequence length against SP and
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

import glob
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

# importing fake_pg registers torch's "fake" backend (collectives return at once, no peers needed);
# torch keeps it under testing/_internal and uses it to run distributed code at any world size
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_apriel.config import ConfigError
from megatron_apriel.data.blends import blend_weights, resolve_stage, train_samples_for
from megatron_apriel.models import float8
from megatron_apriel.models.builder import build_model_chunks, float8_layers
from megatron_apriel.models.flops import PEAK_BF16_FLOPS, flops_per_token
from megatron_apriel.models.info import GiB, activation_bytes, human_count
from megatron_apriel.models.llava import build_llava_chunks
from megatron_apriel.models.presets import ModelPreset, get_preset, padded_vocab_size
from megatron_apriel.runtime import cpu_backend
from megatron_apriel.training.config import TrainConfig, blend_spec_of, stage_load
from megatron_apriel.training.freeze import freeze_groups

# slurm/cpt.sh's defaults, the geometry the recipe's configs are written for
DEFAULT_GPUS_PER_NODE = 8
ASSUMED_MFU = 0.4


@dataclass
class Layout:
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def _preset(cfg: TrainConfig) -> ModelPreset:
    try:
        return get_preset(cfg.model.preset, **cfg.model.changes)
    except KeyError as e:
        raise ConfigError(f"model.preset: {e.args[0]}") from None
    except TypeError as e:
        raise ConfigError(f"model.changes: {e}") from None


def _divides(key: str, value: int, what: str, n: int) -> None:
    if n % value:
        raise ConfigError(f"{key}: {value} does not divide {what} ({n})")


def check_layout(cfg: TrainConfig, preset: ModelPreset, nodes: int | None, gpus_per_node: int | None
                 ) -> tuple[Layout, int, list[str]]:
    """The layout of the run and its micro-batches per step; ConfigError naming the key otherwise."""
    m, t = cfg.model, cfg.train
    notes = []
    for key, v in (("model.tp", m.tp), ("model.pp", m.pp), ("model.cp", m.cp),
                   ("train.micro_batch_size", t.micro_batch_size), ("train.global_batch_size", t.global_batch_size),
                   ("train.seq_length", t.seq_length)):
        if v < 1:
            raise ConfigError(f"{key}: must be at least 1, got {v}")
    vpp = m.vpp or 1
    _divides("model.tp", m.tp, f"the attention heads of {preset.name}", preset.num_attention_heads)
    _divides("model.tp", m.tp, f"the query groups of {preset.name}", preset.num_query_groups)
    _divides("model.tp", m.tp, f"the FFN size of {preset.name}", preset.ffn_hidden_size)
    if preset.vision is not None:
        _divides("model.tp", m.tp, f"the vision encoder's attention heads of {preset.name}",
                 preset.vision.num_attention_heads)
        _divides("model.tp", m.tp, f"the vision encoder's FFN size of {preset.name}", preset.vision.ffn_hidden_size)
    if vpp > 1 and m.pp < 2:
        raise ConfigError(f"model.vpp: virtual stages ({vpp}) need model.pp > 1")
    key = "model.vpp" if vpp > 1 else "model.pp"
    _divides(key, m.pp * vpp, f"the layers of {preset.name} (model.pp x model.vpp = {m.pp * vpp})"
             if vpp > 1 else f"the layers of {preset.name}", preset.num_layers)
    if m.sequence_parallel and m.tp == 1:
        notes.append("model.sequence_parallel has no effect at model.tp 1")
    if m.sequence_parallel and m.tp > 1 and t.seq_length % m.tp:
        raise ConfigError(f"train.seq_length: {t.seq_length} is not divisible by model.tp {m.tp} "
                          "(sequence parallelism)")
    if m.cp > 1:
        if t.seq_length % (2 * m.cp):
            raise ConfigError(f"train.seq_length: {t.seq_length} is not divisible by 2 x model.cp = {2 * m.cp}")
        notes.append("model.cp > 1 needs Transformer Engine's attention (GPU)")
    mp = m.tp * m.pp * m.cp
    # default: the smallest allocation of the layout, data-parallel size 1
    g = gpus_per_node or min(mp, DEFAULT_GPUS_PER_NODE)
    n = nodes if nodes is not None else max(1, math.ceil(mp / g))
    if (n * g) % mp:
        raise ConfigError(f"--nodes x --gpus-per-node: {n} x {g} = {n * g} GPUs is not a multiple of "
                          f"model.tp x model.pp x model.cp = {mp}")
    if m.tp > g:
        notes.append(f"model.tp {m.tp} spans nodes ({g} GPUs per node): TP traffic leaves NVLink")
    dp = n * g // mp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size "
                          f"{t.micro_batch_size} x data-parallel size {dp}")
    n_mb = t.global_batch_size // (t.micro_batch_size * dp)
    if vpp > 1 and n_mb % m.pp:
        raise ConfigError(f"train.global_batch_size: {n_mb} micro-batches per step is not a multiple of model.pp "
                          f"{m.pp}, as the interleaved (virtual-stage) schedule needs")
    if m.pp > 1 and n_mb < m.pp:
        notes.append(f"{n_mb} micro-batches per step < model.pp {m.pp}: the pipeline never fills")
    return Layout(m.tp, m.pp, vpp, m.cp, dp, n, g), n_mb, notes


def check_files(cfg: TrainConfig) -> list[str]:
    """Data and checkpoint paths as training would read them; lines describing the data."""
    lines = []
    if cfg.data.kind == "blend":
        spec = blend_spec_of(cfg)
        infos = blend_weights(spec)  # every prefix's .bin/.idx read, a ConfigError naming it otherwise
        need = train_samples_for(spec, cfg.train.global_batch_size) * resolve_stage(spec).seq_length
        for source in dict.fromkeys(i.source for i in infos):
            mine = [i for i in infos if i.source == source]
            have, share = sum(i.tokens for i in mine), sum(i.weight for i in mine)
            epochs = need * share / have
            above = epochs > spec.repeat_warning
            warn = f"  (above data.blend.repeat_warning {spec.repeat_warning:g})" if above else ""
            lines.append(f"data: source {source!r}: {have:,d} tokens on disk, {share:.1%} of {need:,d} "
                         f"-> {epochs:.2f} epochs{warn}")
    else:
        for key in ("prefix", "blend"):
            value = cfg.data.factory_args.get(key)
            if isinstance(value, str) and not (os.path.exists(value) or glob.glob(glob.escape(value) + "*")):
                raise ConfigError(f"data.factory_args.{key}: nothing at {value!r}")
        lines.append(f"data: {cfg.data.factory} with {cfg.data.factory_args}")
    load = cfg.checkpoint.load or stage_load(cfg)
    if load and not os.path.exists(load):
        raise ConfigError(f"checkpoint.load: {load} does not exist")
    if cfg.checkpoint.save and os.path.isfile(os.path.join(cfg.checkpoint.save, "latest_checkpointed_iteration.txt")):
        lines.append(f"checkpoint.save: {cfg.checkpoint.save} holds a checkpoint: the run would resume it")
    return lines


def rank_positions(layout: Layout) -> list[tuple[str, int]]:
    """Global ranks of the distinct positions: first, middle and last pipeline stage (TP, CP, DP rank 0).

    megatron-core's default order is tp-cp-ep-dp-pp: the pipeline stage of a rank is
    ``rank // (tp * cp * dp)``. Ranks that differ only in TP/CP/DP rank build the same shapes.
    """
    per_stage = layout.tp * layout.cp * layout.dp
    stages = sorted({0, layout.pp // 2, layout.pp - 1})
    names = {0: "first", layout.pp - 1: "last"}
    return [(("only" if layout.pp == 1 else names.get(s, "middle")) + f" stage {s}", s * per_stage) for s in stages]


def build_rank(cfg: TrainConfig, preset: ModelPreset, layout: Layout, rank: int) -> dict:
    """Build the chunks of one rank on the meta device over a fake process group of the real world size."""
    cpu_backend.activate(force=True)  # nothing runs: the shim only answers megatron-core's CUDA queries
    m, t = cfg.model, cfg.train
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world)
    try:
        ps.initialize_model_parallel(m.tp, m.pp, virtual_pipeline_model_parallel_size=m.vpp if layout.vpp > 1 else None,
                                     context_parallel_size=m.cp, create_gloo_process_groups=False)
        # cp=1 in the layer config: the local spec's attention has no CP, and CP changes no shape
        tcfg = preset.transformer_config(
            tp=m.tp, pp=m.pp, vpp=m.vpp, cp=1, sequence_parallel=m.sequence_parallel,
            params_dtype=torch.bfloat16 if m.bf16 else torch.float32, bf16=m.bf16, recompute=m.recompute,
            recompute_num_layers=m.recompute_num_layers, device="cpu", use_te=False, perform_initialization=False)
        build = build_llava_chunks if preset.vision is not None else build_model_chunks
        fp8 = {} if preset.vision is not None or not float8.torchao_recipe(m.fp8) else dict(
            fp8=m.fp8, fp8_layers=float8_layers(tcfg, m.fp8, m.fp8_bf16_first_layers, m.fp8_bf16_last_layers))
        with torch.device("meta"):
            chunks = build(preset, tcfg, False, max_sequence_length=max(t.seq_length, 4096), **fp8)
        try:
            freeze_groups(chunks, t.freeze)
        except ValueError as e:
            raise ConfigError(f"train.freeze: {e}") from None
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
    """Run every check and build every rank position; prints the report, returns its figures."""
    preset = _preset(cfg)
    layout, n_mb, notes = check_layout(cfg, preset, nodes, gpus_per_node)
    m, t = cfg.model, cfg.train
    vp = f" x VPP {layout.vpp}" if layout.vpp > 1 else ""
    out(f"dry run of {preset.name} at TP {m.tp} x PP {m.pp}{vp} x CP {m.cp} x DP {layout.dp} = {layout.world} GPUs "
        f"({layout.nodes} nodes x {layout.gpus_per_node}; sbatch --nodes={layout.nodes} --gpus-per-node="
        f"{layout.gpus_per_node} --ntasks-per-node={layout.gpus_per_node}), sequence parallel "
        f"{'on' if m.sequence_parallel and m.tp > 1 else 'off'}")
    out(f"batch: {t.global_batch_size} x {t.seq_length} tokens = {n_mb} micro-batches of {t.micro_batch_size} "
        f"per DP rank; vocabulary {preset.vocab_size} padded to {padded_vocab_size(preset.vocab_size, m.tp)}")
    for line in (check_files(cfg) if files else ["data and checkpoint paths not checked (--no-files)"]):
        out(line)
    for note in notes:
        out(f"note: {note}")
    rows = []
    for position, rank in rank_positions(layout):
        built = build_rank(cfg, preset, layout, rank)
        # megatron-core's groups agree with the positions chosen here
        assert (built["dp"], built["pp_rank"]) == (layout.dp, rank // (layout.tp * layout.cp * layout.dp)), built
        rows.append(dict(position=position, rank=rank, chunks=built["chunks"],
                         **rank_memory(cfg, preset, layout, built, n_mb)))
    total = preset.param_counts()["total"]
    if float8.torchao_recipe(m.fp8):
        # torchao's recipes save the bf16 input and weight for the backward pass and cast them again
        # there, so the float8 copies live only through one GEMM: the estimate is the bf16 one
        n = sum(c["float8_linears"] for r in rows for c in r["chunks"])
        out(f"float8 ({m.fp8}): {n} linears in float8 in the rank positions below; memory as bf16 (the float8 "
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
