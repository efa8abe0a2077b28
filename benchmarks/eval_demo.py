"""How long ``apriel eval`` takes on the demo's final model on this machine's CPU.

Runs the evaluation engine of ``apriel eval`` (lm-evaluation-harness, HF backend, fp32 on CPU) on
the demo's held-out addition task file (``test_add.jsonl``) at a few batch sizes and sample counts,
and prints one row each: records, completions, seconds of evaluation (model loading excluded,
listed apart) and completions per second.

    apriel demo --out runs/demo --minutes 1          # once, for the model and the task file
    python benchmarks/eval_demo.py --demo-dir runs/demo [--backend vllm]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:  # vLLM spawns its workers: everything runs under __main__
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-dir", required=True, help="an `apriel demo --out` folder")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--max-gen-toks", type=int, default=72)
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="vllm: where vLLM is installed")
    args = ap.parse_args(argv)

    import torch

    from megatron_apriel.eval.run import Settings, evaluate_model, load_lm
    from megatron_apriel.eval.tasks import parse_task_arg

    demo = Path(args.demo_dir)
    hf, test = demo / "final" / "hf", demo / "data" / "test_add.jsonl"
    for p in (hf, test):
        if not p.exists():
            print(f"eval_demo: {p} not found; run `apriel demo --out {demo}` first", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    load_lm(str(hf), Settings(backend=args.backend))
    load_s = time.perf_counter() - t0
    print(f"backend {args.backend}, torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}; model load {load_s:.1f} s ({hf})")
    rows = []
    for n in args.samples:
        for bs in args.batch_sizes:
            settings = Settings(batch_size=bs, samples=n, temperature=0.0 if n == 1 else 1.0,
                                max_gen_toks=args.max_gen_toks, backend=args.backend)
            spec = parse_task_arg(f"math={test}", n)
            scores, _, runtime = evaluate_model(str(hf), [spec], settings, log=lambda *_: None)
            s = scores[test.stem]
            done = s["records"] * n
            rows.append((s["records"], n, bs, args.max_gen_toks, runtime["seconds"], done / runtime["seconds"],
                         s["pass@1"], s["format"]))
    print(f"\n{'records':>7} {'samples':>7} {'batch':>5} {'max_toks':>8} {'seconds':>8} {'compl/s':>8} "
          f"{'pass@1':>6} {'format':>6}")
    for r in rows:
        print(f"{r[0]:>7} {r[1]:>7} {r[2]:>5} {r[3]:>8} {r[4]:>8.1f} {r[5]:>8.2f} {r[6]:>6.3f} {r[7]:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
