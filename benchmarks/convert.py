"""Time and peak memory of HF <-> megatron-core conversion on a random >= 1B-parameter model.

The model has Mistral-Nemo's width (hidden 5120, 32/8 heads of 128, FFN 14336) with few layers, in
bf16. Each direction runs in its own process, which reports its own time and peak memory (VmHWM and
peak anonymous RSS, see ``benchmarks/_common.py``).

    python benchmarks/convert.py --layers 2 --vocab 65536 --work /tmp/convert_bench
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from _common import run_measured, write_random_mistral


def run_step(args: list[str], work: Path) -> tuple[float, float, float]:
    """One conversion in a child process; (seconds, peak RSS GiB, peak anonymous RSS GiB) of that child."""
    r = run_measured("megatron_apriel.checkpoint.convert", args, work)
    return r["seconds"], r["hwm"] / 2**30, r["anon"] / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--work", default="/tmp/convert_bench")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from megatron_apriel.models import get_preset

    preset = get_preset("mistral-nemo-12b", num_layers=args.layers, vocab_size=args.vocab)
    params = preset.param_counts()["total"]
    if params < 1e9:
        raise SystemExit(f"{params / 1e9:.2f} B parameters: use more --layers or a larger --vocab (>= 1B)")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shard = int(args.shard_gb * 1e9)
    t = time.time()
    _, _, model_bytes = write_random_mistral(work / "hf", preset, shard)
    print(f"random model: {params / 1e9:.2f} B parameters, {model_bytes / 2**30:.2f} GiB bf16 "
          f"({time.time() - t:.0f} s to write)", flush=True)

    rows = []
    to_mcore = ["hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore")]
    rows.append(("hf-to-mcore (TP=1)", *run_step(to_mcore, work)))
    rows.append(("mcore-to-hf", *run_step(["mcore-to-hf", "--ckpt", str(work / "mcore"), "--out", str(work / "back"),
                                           "--max-shard-size", f"{args.shard_gb}GB"], work)))

    # the round trip must be exact, or the timings mean nothing
    import torch

    from megatron_apriel.checkpoint.hf_io import SafetensorsReader

    with SafetensorsReader(work / "hf") as a, SafetensorsReader(work / "back") as b:
        assert set(a.keys()) == set(b.keys())
        bad = [k for k in a.keys() if not torch.equal(a.get(k), b.get(k))]
    if bad:
        raise SystemExit(f"round trip differs on {bad[:5]}")

    gib = model_bytes / 2**30
    print("\n| step | seconds | GiB/s | peak RSS (VmHWM) GiB | VmHWM / model size | peak anonymous RSS GiB |")
    print("|---|---|---|---|---|---|")
    for name, secs, rss, anon in rows:
        print(f"| {name} | {secs:.1f} | {gib / secs:.2f} | {rss:.2f} | {rss / gib:.2f} | {anon:.2f} |")
    print(f"\nmodel {gib:.2f} GiB ({params / 1e9:.2f} B params, bf16), shard {args.shard_gb} GB; "
          "round trip bit-identical")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
