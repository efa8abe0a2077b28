"""``apriel model-info PRESET``: parameters, bytes, and training memory per GPU, without allocating.

Memory model (per GPU, the distributed optimizer of megatron-core, bf16 mixed precision):

* weights: bf16, 2 bytes/param of this rank's shard (TP x PP);
* gradients: fp32 main grads in DDP buffers (``grad_reduce_in_fp32``), 4 bytes/param;
* optimizer: fp32 master weights + Adam m and v, 12 bytes/param, divided by DP (distributed
  optimizer) or not (plain optimizer);
* activations: Korthikanti et al. (2022), per layer ``s*b*h*(34 + 5*a*s/h)`` bytes, divided by TP
  with sequence parallelism; selective recompute drops the ``5as/h`` term; full recompute keeps only
  the layer inputs (``2sbh`` per layer). The 5as/h term assumes the attention scores are stored; with
  flash attention (TE or SDPA) they are not, so the estimate for ``none`` uses the selective figure
  when ``--flash`` (default).
The first pipeline stage holds ``pp`` micro-batches of activations in flight under 1F1B.
"""

from __future__ import annotations

import argparse
import math

from megatron_apriel.errors import cli_main
from megatron_apriel.models.families import family_of
from megatron_apriel.models.presets import PRESETS, get_preset

GiB = 1024**3


def stage_params(preset, tp: int, pp: int) -> int:
    """Parameters held by the most loaded rank (first stage: embeddings, vision encoder, projector
    and its layers; last stage: its layers and the output layer)."""
    c = preset.param_counts()
    layers = math.ceil(preset.num_layers / pp)
    first = (c["embedding"] + c["vision_encoder"] + c["projector"] + layers * c["per_layer"]
             + (c["output_layer"] + c["final_norm"] if pp == 1 else 0))
    last = c["output_layer"] + c["final_norm"] + layers * c["per_layer"]
    return max(first, last) // tp


def activation_bytes(preset, seq: int, micro_batch: int, tp: int, sequence_parallel: bool = True,
                     recompute: str = "selective", flash: bool = True) -> float:
    """Activation bytes one decoder layer keeps for the backward pass (Korthikanti et al. 2022).

    ``34 sbh / t`` with sequence parallelism, ``sbh (10 + 24 / t)`` without (the norms' and dropouts'
    inputs are then replicated over TP); plus ``5 a s^2 b / t`` for the attention scores unless they
    are recomputed (selective) or never stored (flash attention); full recompute keeps the input only.
    """
    s, b, h, a = seq, micro_batch, preset.hidden_size, preset.num_attention_heads
    if recompute == "full":
        return 2 * s * b * h / (tp if sequence_parallel else 1)
    per_layer = s * b * h * (34 / tp if sequence_parallel else 10 + 24 / tp)
    if recompute == "none" and not flash:
        per_layer += s * b * h * (5 * a * s / h) / tp
    return per_layer


def memory_estimate(preset, tp=1, pp=1, dp=1, seq=4096, micro_batch=1, recompute="selective",
                    distributed_optimizer=True, flash=True) -> dict[str, float]:
    params = stage_params(preset, tp, pp)
    weights = 2 * params
    grads = 4 * params
    optim = 12 * params / (dp if distributed_optimizer else 1)
    per_layer = activation_bytes(preset, seq, micro_batch, tp, True, recompute, flash)
    layers = math.ceil(preset.num_layers / pp)
    in_flight = pp  # 1F1B: the first stage keeps pp micro-batches of activations
    activations = per_layer * layers * in_flight
    logits = 4 * seq * micro_batch * preset.vocab_size / tp * 2 if pp == 1 else 0  # fp32 logits + grad
    total = weights + grads + optim + activations + logits
    return {
        "params_per_gpu": params,
        "weights_GiB": weights / GiB,
        "grads_GiB": grads / GiB,
        "optimizer_GiB": optim / GiB,
        "activations_GiB": (activations + logits) / GiB,
        "total_GiB": total / GiB,
    }


def human_count(n: int, digits: int = 2) -> str:
    return f"{n / 1e9:.{digits}f} B" if n >= 1e8 else f"{n / 1e6:.{digits}f} M"


def preset_table() -> str:
    """The README's preset table (markdown), made from PRESETS so the figures are the code's."""
    rows = ["| preset | HF class | layers | hidden | heads (q/kv) | head_dim | FFN | vocab | rope θ | params |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in PRESETS.items():
        c = p.param_counts()
        cls = p.hf_architecture
        params = human_count(c["total"])
        if family_of(p).has_images:
            v = p.vision
            cls += f" (Pixtral vision {v.num_layers} x {v.hidden_size}, patch {v.patch_size}, + 2-layer GELU projector)"
            params += (f" (decoder {human_count(c['decoder'])} + vision {human_count(c['vision_encoder'])}"
                       f" + projector {human_count(c['projector'])})")
        rows.append(f"| `{name}` | {cls} | {p.num_layers} | {p.hidden_size} | {p.num_attention_heads} / "
                    f"{p.num_query_groups} | {p.kv_channels} | {p.ffn_hidden_size} | {p.vocab_size} | "
                    f"{p.rope_theta:.0e}".replace("e+0", "e").replace("e+", "e") + f" | {params} |")
    return "\n".join(rows)


@cli_main()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="apriel model-info", description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", choices=sorted(PRESETS))
    ap.add_argument("--table", action="store_true", help="print the markdown table of all presets (the README's)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="selective")
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    args = ap.parse_args(argv)
    if args.table:
        print(preset_table())
        return 0
    if args.preset is None:
        ap.error("give a preset (or --table)")
    p = get_preset(args.preset)
    c = p.param_counts()
    family = family_of(p)
    print(f"preset {p.name}: {p.description} (family {family.name}: {family.description})")
    print(f"  layers {p.num_layers}, hidden {p.hidden_size}, heads {p.num_attention_heads}/{p.num_query_groups} "
          f"(head_dim {p.kv_channels}), ffn {p.ffn_hidden_size}, vocab {p.vocab_size}, rope_theta {p.rope_theta:g}")
    print(f"  parameters total      {c['total']:>16,d}  ({c['total'] / 1e9:.2f} B)")
    if family.has_images:
        v = p.vision
        print(f"    vision encoder      {c['vision_encoder']:>16,d}  "
              f"({v.num_layers} layers x {v.hidden_size}, patch {v.patch_size})")
        print(f"    projector           {c['projector']:>16,d}  "
              f"(2-layer {v.projector_hidden_act} MLP {v.hidden_size} -> {p.hidden_size})")
        print(f"    decoder             {c['decoder']:>16,d}  ({c['decoder'] / 1e9:.2f} B)")
    print(f"    embedding           {c['embedding']:>16,d}")
    print(f"    output layer        {c['output_layer']:>16,d}")
    print(f"    per layer           {c['per_layer']:>16,d}  "
          f"(attention {c['per_layer_attention']:,d}, mlp {c['per_layer_mlp']:,d})")
    print(f"  bf16 weights          {2 * c['total'] / GiB:>13.2f} GiB")
    m = memory_estimate(p, args.tp, args.pp, args.dp, args.seq, args.micro_batch, args.recompute,
                        not args.no_distributed_optimizer)
    print(f"  training memory per GPU at TP={args.tp} PP={args.pp} DP={args.dp}, seq {args.seq}, "
          f"micro-batch {args.micro_batch}, recompute {args.recompute}:")
    for key in ("weights_GiB", "grads_GiB", "optimizer_GiB", "activations_GiB", "total_GiB"):
        print(f"    {key[:-4]:<20} {m[key]:>10.2f} GiB")
    return 0
