"""``apriel grpo-info --config GRPO.yaml``: memory per GPU of a GRPO run under FSDP, without allocating.

The training side of GRPO is TRL's GRPOTrainer on an HF model, sharded by accelerate's FSDP (the
config shipped as ``examples/apriel_nemotron_15b/accelerate_fsdp.yaml``), so the model of
``apriel model-info`` (megatron-core's distributed optimizer) does not apply. Per GPU, FSDP full
sharding over ``gpus`` ranks, bf16 mixed precision:

* sharded states: accelerate keeps fp32 parameters under FSDP mixed precision, so fp32 weights,
  fp32 gradients and Adam m and v: 16 bytes/param, divided by the number of GPUs;
* gathered: bf16 copies of the unit being computed and the one prefetched (two decoder layers) and
  of the output layer while the logits are made;
* reference model (``grpo.beta > 0``): bf16, sharded like the policy;
* activations with gradient checkpointing: each layer's bf16 input (``2sbh``) plus one layer
  recomputed in full (``34sbh``, flash/SDPA attention keeps no scores), ``s`` = prompt + completion,
  ``b`` = ``per_device_train_batch_size``;
* logits over the completion tokens: bf16 logits, their temperature-scaled copy and their gradient
  (6 bytes per vocabulary entry; TRL takes log-probs row by row, so no fp32 copy of the whole);
* vLLM colocated: ``vllm_gpu_memory_utilization`` of the GPU, which holds vLLM's bf16 weights
  (divided by ``vllm_tensor_parallel_size``) and the KV cache; with ``vllm_enable_sleep_mode`` it is
  released while the trainer steps, so only the generation phase carries it. Server mode keeps vLLM
  on its own GPUs.

Peak = max(training phase, generation phase). Fragmentation, NCCL buffers and the CUDA context
(a few GiB) are not counted: leave that margin.
"""

from __future__ import annotations

import argparse
import sys

from megatron_apriel.config import load_config
from megatron_apriel.errors import cli_main
from megatron_apriel.models.presets import PRESETS, get_preset
from megatron_apriel.rl.grpo import GRPORunConfig

GiB = 1024**3


def grpo_memory(preset, g, gpus: int, prompt_len: int = 2048, gpu_GiB: float = 80.0) -> dict[str, float]:
    """Per-GPU bytes (as GiB) of each part for ``g`` (a GRPOSection) on ``gpus`` FSDP ranks."""
    c = preset.param_counts()
    P, L, h = c["total"], preset.num_layers, preset.hidden_size
    s, b = prompt_len + g.max_completion_length, g.per_device_train_batch_size
    states = 16 * P / gpus
    gathered = 2 * (2 * c["per_layer"] + max(c["embedding"], c["output_layer"]))
    reference = 2 * P / gpus if g.beta > 0 else 0.0
    activations = L * 2 * s * b * h + 34 * s * b * h
    logits = 6 * g.max_completion_length * b * preset.vocab_size
    colocated = g.vllm_mode == "colocate" and g.use_vllm != "false"
    vllm = g.vllm_gpu_memory_utilization * gpu_GiB * GiB if colocated else 0.0
    vllm_weights = 2 * P / g.vllm_tensor_parallel_size if colocated else 0.0
    kv_per_token = 2 * L * preset.num_query_groups * preset.kv_channels * 2 / g.vllm_tensor_parallel_size
    sleep = g.vllm_enable_sleep_mode
    train_phase = states + gathered + reference + activations + logits + (0.0 if sleep else vllm)
    gen_phase = states + reference + gathered + vllm
    out = {"states": states, "gathered": gathered, "reference": reference, "activations": activations,
           "logits": logits, "vllm": vllm, "vllm_weights": vllm_weights,
           "train_phase": train_phase, "generation_phase": gen_phase, "peak": max(train_phase, gen_phase)}
    out = {k: v / GiB for k, v in out.items()}
    out["kv_cache_tokens"] = max(0.0, vllm - vllm_weights) / kv_per_token if colocated else 0.0
    out["fits"] = out["peak"] <= gpu_GiB and (not colocated or vllm > vllm_weights)
    return out


@cli_main()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="apriel grpo-info", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="GRPO config (examples/*/grpo.yaml)")
    ap.add_argument("--preset", default="apriel-nemotron-15b", choices=sorted(PRESETS))
    ap.add_argument("--gpus", type=int, default=16, help="training GPUs (FSDP ranks) in all")
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--prompt-len", type=int, default=2048, help="longest prompt in tokens")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. grpo.beta=0.01")
    args = ap.parse_args(argv)
    # The paths a run needs do not change its memory: fill them so that a recipe config loads as is.
    cfg = load_config(GRPORunConfig, args.config, ["model.path=unused", "data.train_file=unused", *args.overrides])
    g, p = cfg.grpo, get_preset(args.preset)
    m = grpo_memory(p, g, args.gpus, args.prompt_len, args.gpu_memory)
    vllm = "off" if g.use_vllm == "false" else (
        f"{g.vllm_mode}, TP {g.vllm_tensor_parallel_size}, {g.vllm_gpu_memory_utilization:g} of the GPU"
        + (", sleep mode" if g.vllm_enable_sleep_mode else ""))
    print(f"GRPO memory per GPU: preset {p.name} ({p.param_counts()['total'] / 1e9:.2f} B), FSDP over {args.gpus} "
          f"GPUs, {args.prompt_len} + {g.max_completion_length} tokens, micro-batch "
          f"{g.per_device_train_batch_size}, beta {g.beta:g}, vLLM {vllm}")
    rows = [("sharded fp32 weights+grads+Adam", "states"), ("gathered bf16 units", "gathered"),
            ("reference model (beta > 0)", "reference"), ("activations (checkpointed)", "activations"),
            ("logits over completions", "logits"), ("vLLM reservation (colocate)", "vllm"),
            ("  of which vLLM weights", "vllm_weights"), ("training phase", "train_phase"),
            ("generation phase", "generation_phase"), ("peak", "peak")]
    for label, key in rows:
        print(f"  {label:<34} {m[key]:>8.2f} GiB")
    if m["vllm"]:
        print(f"  vLLM KV cache: {m['kv_cache_tokens']:,.0f} tokens per engine")
    verdict = "fits" if m["fits"] else "does NOT fit"
    print(f"  {verdict} in {args.gpu_memory:g} GiB (leave a few GiB for the CUDA context and fragmentation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
