"""Throughput and per-run overhead of the code reward's sandbox, next to a bare interpreter start.

A trivial program (``pass``) is graded through ``run_python`` (one sandbox at a time) and on N
threads at once, as the pool ``run_many`` does; the baseline is ``python -c pass`` (and ``python -I -S
-c pass``, the flags the harness uses) started with the same interpreter by the same ``subprocess``
call, one at a time. The "asserts" rows grade a trivial function against three assert tests: one
program's process and one test process (two sandboxes) per program, three calls answered with values.
"latency" is one run's wall time as the grader sees it (files, bwrap, harness, cleanup); "x bare"
divides its median by the median bare ``python -c pass``. The "sandbox" and "asserts" rows of one
setting are measured alternately, ten runs at a time.

    python benchmarks/sandbox.py                     # 1 and os.cpu_count() workers
    python benchmarks/sandbox.py --runs 200 --workers 1 4 8 --json sandbox.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

from megatron_apriel.rl.rewards.sandbox import SandboxLimits, choose_python, isolation_mode, run_python


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bare(python: str, flags: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([python, *flags, "-c", "pass"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return times


ASSERT_PROGRAM = "def f(x):\n    return x + 1"
ASSERTS = ["assert f(1) == 2", "assert f(-1) == 0", "assert [f(i) for i in range(3)] == [1, 2, 3]"]


def sandboxed(limits: SandboxLimits, runs: int, asserts: bool = False) -> tuple[float, list[float]]:
    """(seconds for all runs, per-run latencies) of ``runs`` trivial programs on ``limits.workers``
    threads each calling run_python, as the pool of run_many does (timed per call here)."""
    def one(_):
        t = time.perf_counter()
        if asserts:
            res = run_python(ASSERT_PROGRAM, "", limits, check=ASSERTS)
        else:
            res = run_python("pass", "", limits)
        if not res.completed or (not asserts and not res.ok):
            raise SystemExit(f"a trivial program failed in the sandbox: {res}")
        return time.perf_counter() - t

    start = time.perf_counter()
    if limits.workers == 1:
        latencies = [one(i) for i in range(runs)]
    else:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(limits.workers) as pool:
            latencies = list(pool.map(one, range(runs)))
    return time.perf_counter() - start, latencies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=100, help="programs per row")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="pool sizes (default: 1 and the core count)")
    p.add_argument("--isolation", nargs="+", default=["bwrap"], choices=["bwrap", "rlimits-only"])
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    workers = args.workers or sorted({1, cores})
    python = choose_python(SandboxLimits())
    run_python("pass")  # warm the isolation check and the page cache
    base = {"python -c pass": bare(python, [], args.runs),
            "python -I -S -c pass": bare(python, ["-I", "-S"], args.runs)}
    ref = statistics.median(base["python -c pass"])
    rows = [{"what": name, "workers": 1, "runs": len(t), "programs_per_s": len(t) / sum(t),
             "median_ms": 1e3 * statistics.median(t), "p95_ms": 1e3 * percentile(t, 0.95)} for name, t in base.items()]
    # The two kinds alternate in chunks of 10 runs, so a change of load on a shared machine falls on both.
    for mode in args.isolation:
        for n in workers:
            limits = SandboxLimits(workers=n, isolation=mode)
            isolation_mode(limits)
            measured = {"sandbox": [0.0, []], "asserts": [0.0, []]}
            for start in range(0, args.runs, 10):
                for what, acc in measured.items():
                    total, lat = sandboxed(limits, min(10, args.runs - start), asserts=what == "asserts")
                    acc[0] += total
                    acc[1] += lat
            for what, (total, lat) in measured.items():
                rows.append({"what": f"{what} ({mode})", "workers": n, "runs": args.runs,
                             "programs_per_s": args.runs / total,
                             "median_ms": 1e3 * statistics.median(lat), "p95_ms": 1e3 * percentile(lat, 0.95)})
    for r in rows:
        r["per_core"] = r["programs_per_s"] / min(r["workers"], cores)
        r["x_bare"] = r["median_ms"] / (1e3 * ref)
    load = os.getloadavg()[0]
    print(f"{python} on {cores} cores (load average {load:.1f}); trivial program, {args.runs} runs per row")
    head = (f"{'what':<22} {'workers':>7} {'programs/s':>10} {'per core':>9} {'median ms':>10} {'p95 ms':>8} "
            f"{'x bare':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['what']:<22} {r['workers']:>7} {r['programs_per_s']:>10.1f} {r['per_core']:>9.1f} "
              f"{r['median_ms']:>10.1f} {r['p95_ms']:>8.1f} {r['x_bare']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": python, "cores": cores, "load": load, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
