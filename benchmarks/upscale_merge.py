"""Time and peak memory of depth upscaling and of a 3-way average on a >= 1B-parameter checkpoint.

    python benchmarks/upscale_merge.py --work /tmp/upscale_bench [--layers 3 --vocab 32768]

Writes random bf16 Mistral checkpoints of Nemo width (hidden 5120, FFN 14336, 32/8 heads of 128)
with ``ShardedSafetensorsWriter``, then runs ``apriel upscale`` (middle layer duplicated) and
``apriel average`` (3 inputs, 0.3/0.3/0.4) each in a fresh subprocess. Peak memory is that
process's own: VmHWM (peak resident set, which counts the memory-mapped input pages the kernel may
drop at will) and the peak of RssAnon sampled every 20 ms (memory the process really owns: tensors
in flight, the fp32 accumulator of a block; output shards are written in place, never held).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading, time, resource
peak = {"anon": 0}
def sample():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
module, argv = sys.argv[1], sys.argv[2:]
import importlib
main = importlib.import_module(module).main
t0 = time.perf_counter()
rc = main(argv)
seconds = time.perf_counter() - t0
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print("BENCH " + json.dumps({"rc": rc, "seconds": seconds, "hwm": hwm, "anon": peak["anon"]}))
"""


def make_model(folder: Path, layers: int, vocab: int, seed: int) -> tuple[int, int]:
    import torch

    from megatron_apriel.checkpoint.hf_io import ShardedSafetensorsWriter
    from megatron_apriel.models import get_preset

    preset = get_preset("mistral-nemo-12b", num_layers=layers, vocab_size=vocab)
    folder.mkdir(parents=True)
    preset.hf_config(dtype="bfloat16").save_pretrained(folder)
    h, f, q, kv = preset.hidden_size, preset.ffn_hidden_size, 32 * 128, 8 * 128
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    g = torch.Generator().manual_seed(seed)
    writer = ShardedSafetensorsWriter(folder, max_shard_bytes=2 * 1024**3)
    params, largest = 0, 0
    for name, shape in shapes.items():
        t = (torch.rand(shape, generator=g, dtype=torch.float32) - 0.5).to(torch.bfloat16)
        writer.add(name, t)
        del t
        n = 1
        for s in shape:
            n *= s
        params, largest = params + n, max(largest, n)
    writer.close()
    return params, largest


def run_child(module: str, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, module, *argv], capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{module} {argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(line[6:])
    if result["rc"] != 0:
        raise SystemExit(f"{module} returned {result['rc']}:\n{proc.stderr[-3000:]}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/upscale_merge_bench", help="scratch folder (removed at the end)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="output shard size of both tools")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        for seed in range(3):
            params, largest = make_model(work / f"in{seed}", args.layers, args.vocab, seed)
        gb = params * 2 / 1e9
        print(f"3 random bf16 models of {params / 1e9:.2f} B parameters ({gb:.2f} GB each, largest tensor "
              f"{largest * 2 / 1e6:.0f} MB) written in {time.perf_counter() - t0:.0f} s", flush=True)
        shard = ["--max-shard-gb", str(args.shard_gb)]
        rows = []
        r = run_child("megatron_apriel.checkpoint.upscale",
                      ["--hf", str(work / "in0"), "--out", str(work / "up"), "--duplicate-middle", "1", *shard])
        rows.append((f"upscale {args.layers} -> {args.layers + 1} layers", gb, r))
        r = run_child("megatron_apriel.checkpoint.average",
                      [str(work / f"in{i}") for i in range(3)] + ["--weights", "0.3", "0.3", "0.4", "--out", str(work / "avg"), *shard])
        rows.append(("average of 3 (0.3/0.3/0.4)", 3 * gb, r))
        print(f"\nshard size {args.shard_gb:g} GB, largest tensor {largest * 2 / 1e9:.2f} GB (bf16)")
        print(f"| operation | GB read | seconds | GB/s read | peak RSS (VmHWM) GB | peak anonymous RSS GB |")
        print(f"|---|---|---|---|---|---|")
        for name, read_gb, r in rows:
            print(f"| {name} | {read_gb:.2f} | {r['seconds']:.1f} | {read_gb / r['seconds']:.2f} | "
                  f"{r['hwm'] / 1e9:.2f} | {r['anon'] / 1e9:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
