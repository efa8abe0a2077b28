"""Packing efficiency (real tokens / slots) and planning speed of the SFT packer.

Draws document lengths from log-normal distributions shaped like SFT corpora with reasoning
traces (long right tail, clipped at the training length) and compares the planner of
megatron_apriel.data.packing (best-fit decreasing over shuffled windows) with in-order greedy
concatenation and one document per row.

    python benchmarks/packing.py                    # default table
    python benchmarks/packing.py --docs 200000 --json packing.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from megatron_apriel.data.packing import packing_efficiency, plan_bins

# (name, capacity, median length, sigma): an 8k SFT mix, Apriel's 32k reasoning SFT, short chat at 4k.
DISTRIBUTIONS = [
    ("sft-8k", 8192, 1500, 0.9),
    ("reasoning-32k", 32768, 5000, 1.0),
    ("chat-4k", 4096, 400, 1.2),
]


def greedy_in_order(lengths, capacity):
    bins, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if used + n > capacity:
            bins.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += int(n)
    if cur:
        bins.append(cur)
    return bins


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=100000)
    p.add_argument("--windows", type=int, nargs="+", default=[1000, 20000, 0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    for name, cap, median, sigma in DISTRIBUTIONS:
        lengths = np.clip(rng.lognormal(np.log(median), sigma, args.docs).astype(np.int64), 16, cap)
        methods = [("one doc per row", lambda: [[i] for i in range(len(lengths))]),
                   ("greedy in order", lambda: greedy_in_order(lengths, cap))]
        for w in args.windows:
            window = w if w > 0 else len(lengths)
            label = f"BFD window {w}" if w > 0 else "BFD whole set"
            methods.append((label, lambda window=window: plan_bins(lengths, cap, seed=args.seed, window=window)))
        for label, fn in methods:
            t0 = time.perf_counter()
            bins = fn()
            dt = time.perf_counter() - t0
            rows.append({"distribution": name, "capacity": cap, "mean_len": float(lengths.mean()),
                         "method": label, "rows": len(bins),
                         "efficiency": packing_efficiency(lengths, bins, cap),
                         "docs_per_row": len(lengths) / len(bins), "seconds": dt})
    head = (f"{'distribution':<14} {'cap':>6} {'mean len':>8} {'method':<18} {'rows':>7} {'docs/row':>8} "
            f"{'efficiency':>10} {'plan s':>7}")
    print(f"{args.docs} documents per distribution (log-normal lengths, clipped to the capacity)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['distribution']:<14} {r['capacity']:>6} {r['mean_len']:>8.0f} {r['method']:<18} {r['rows']:>7} "
              f"{r['docs_per_row']:>8.2f} {100 * r['efficiency']:>9.2f}% {r['seconds']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
