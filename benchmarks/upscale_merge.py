"""Time and peak memory of depth upscaling and of a 3-way average on a >= 1B-parameter checkpoint.

    python benchmarks/upscale_merge.py --work /tmp/upscale_bench [--layers 3 --vocab 32768]

Writes random bf16 Mistral checkpoints of Nemo width (hidden 5120, FFN 14336, 32/8 heads of 128)
with ``ShardedSafetensorsWriter``, then runs ``apriel upscale`` (middle layer duplicated) and
``apriel average`` (3 inputs, 0.3/0.3/0.4) each in a fresh subprocess that reports its own peak
memory (VmHWM and peak anonymous RSS, see ``benchmarks/_common.py``; output shards are written in
place, never held).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from _common import run_measured, write_random_mistral


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
        from megatron_apriel.models import get_preset

        preset = get_preset("mistral-nemo-12b", num_layers=args.layers, vocab_size=args.vocab)
        for seed in range(3):
            params, largest, _ = write_random_mistral(work / f"in{seed}", preset, 2 * 1024**3, seed)
        gb = params * 2 / 1e9
        print(f"3 random bf16 models of {params / 1e9:.2f} B parameters ({gb:.2f} GB each, largest tensor "
              f"{largest * 2 / 1e6:.0f} MB) written in {time.perf_counter() - t0:.0f} s", flush=True)
        shard = ["--max-shard-gb", str(args.shard_gb)]
        rows = []
        r = run_measured("megatron_apriel.checkpoint.upscale",
                         ["--hf", str(work / "in0"), "--out", str(work / "up"), "--duplicate-middle", "1", *shard],
                         work)
        rows.append((f"upscale {args.layers} -> {args.layers + 1} layers", gb, r))
        r = run_measured("megatron_apriel.checkpoint.average",
                         [str(work / f"in{i}") for i in range(3)]
                         + ["--weights", "0.3", "0.3", "0.4", "--out", str(work / "avg"), *shard], work)
        rows.append(("average of 3 (0.3/0.3/0.4)", 3 * gb, r))
        print(f"\nshard size {args.shard_gb:g} GB, largest tensor {largest * 2 / 1e9:.2f} GB (bf16)")
        print("| operation | GB read | seconds | GB/s read | peak RSS (VmHWM) GB | peak anonymous RSS GB |")
        print("|---|---|---|---|---|---|")
        for name, read_gb, r in rows:
            print(f"| {name} | {read_gb:.2f} | {r['seconds']:.1f} | {read_gb / r['seconds']:.2f} | "
                  f"{r['hwm'] / 1e9:.2f} | {r['anon'] / 1e9:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
