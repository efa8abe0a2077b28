"""What the checkpoint benchmarks share: a random Nemo-width model on disk, and running one tool in
a fresh process that reports its own time and peak memory.

Peak memory is read from the child's ``/proc/self/status``: VmHWM (peak resident set, which counts
resident pages of memory-mapped safetensors files the kernel may drop at will) and the peak of
RssAnon sampled every 20 ms (memory the process owns: tensors in flight, accumulators).
``ru_maxrss`` is not used: across ``exec`` it keeps the parent's peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A file, not ``python -c``: megatron-core's dist_checkpointing writer re-imports ``__main__``.
CHILD = r"""
import importlib, json, sys, threading, time
peak = {"anon": 0}
def sample():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
        time.sleep(0.02)
if __name__ == "__main__":
    threading.Thread(target=sample, daemon=True).start()
    main = importlib.import_module(sys.argv[1]).main
    t0 = time.perf_counter()
    rc = main(sys.argv[2:])
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    print("BENCH " + json.dumps({"rc": rc, "seconds": seconds, "hwm": hwm, "anon": peak["anon"]}))
    sys.exit(rc)
"""


def run_measured(module: str, argv: list[str], work: Path) -> dict:
    """``module.main(argv)`` in a fresh process: {rc, seconds, hwm, anon} (bytes) of that process."""
    script = Path(work) / "bench_child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(script), module, *map(str, argv)], capture_output=True, text=True,
                          env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{module} {argv} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[6:])


def write_random_mistral(folder: Path, preset, shard_bytes: int, seed: int = 0) -> tuple[int, int, int]:
    """A random bf16 MistralForCausalLM folder written tensor by tensor (no model in memory).

    Returns (parameters, elements of the largest tensor, bytes written)."""
    import torch

    from megatron_apriel.checkpoint.hf_io import ShardedSafetensorsWriter
    from megatron_apriel.checkpoint.mistral import hf_names

    h, d, f = preset.hidden_size, preset.kv_channels, preset.ffn_hidden_size
    q, kv = preset.num_attention_heads * d, preset.num_query_groups * d
    shapes = {"embed_tokens": (preset.vocab_size, h), "lm_head": (preset.vocab_size, h), "norm": (h,),
              "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f), "layernorm": (h,)}
    gen = torch.Generator().manual_seed(seed)
    writer = ShardedSafetensorsWriter(folder, max_shard_bytes=shard_bytes)
    params, largest = 0, 0
    for name in hf_names(preset):
        part = name.split(".")[-2]
        shape = shapes["layernorm" if part.endswith("layernorm") else part]
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, t)
        params, largest = params + t.numel(), max(largest, t.numel())
        del t
    writer.close()
    preset.hf_config(dtype="bfloat16").save_pretrained(folder)
    return params, largest, writer.total_bytes
