"""What each fault costs on a real SLURM: detected after, restarted after, steps recomputed, same losses.

Starts a one-node SLURM on localhost (tests/slurm_cluster.py; root and Debian's slurm packages),
runs the tiny CPT config as ``sbatch slurm/cpt.sh`` with 2 tasks (DP=2 on CPU), once without a
fault and once per ``fault.inject`` drill, and prints one table row per drill:

- detected after: from the drill's own log line (the fault) to the line that reports it (the
  watchdog's culprit report, the task wrapper seeing a killed rank, the NaN error, the first
  straggler report, the failed verification at restart);
- restarted after: from the fault to the first training step of the requeued run. The local
  cluster is asked to start a requeued job 5 s after it is requeued (slurmctld otherwise holds it
  about 2 minutes, as on production clusters);
- steps recomputed: the last step logged before the fault minus the iteration the restart resumed;
- final losses equal: every step's loss in ``metrics.jsonl`` equal (exactly) to the run without a
  fault.

    sudo PYTHONPATH=. python benchmarks/faults.py [--steps 20] [--step-timeout 10] [--kinds hang,crash]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from slurm_cluster import SlurmCluster, missing_binaries  # noqa: E402

ALLOC = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=2", "--time=30"]
DRILLS = {  # kind: (rank, step, extra)
    "hang": (1, 12, {}),
    "crash": (1, 12, {}),
    "corrupt-checkpoint": (0, 10, {}),
    "nan": (0, 12, {}),
    "slow": (1, 3, {"seconds": 0.5}),
}
# the line that shows the fault, and the line that shows it was detected, per kind
FAULT_LINE = {"hang": "fault drill: rank 1 hangs", "crash": "fault drill: rank 1 crashes",
              "corrupt-checkpoint": "fault drill: rank 0 cut", "nan": "fault drill: rank 0 makes its gradients NaN",
              "slow": "fault drill: rank 1 slows down"}
DETECT_LINE = {"hang": "fault: hang detected", "crash": "was killed by SIGKILL",
               "corrupt-checkpoint": "failed verification", "nan": "error: non-finite", "slow": "stragglers at step"}


class LogWatch:
    """Follows a job log and keeps when each line first appeared (the lines carry no time)."""

    def __init__(self, path: Path):
        self.path, self.lines, self._stop = path, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        pos, buf = 0, ""
        while not self._stop.is_set():
            if self.path.exists():
                with open(self.path) as f:
                    f.seek(pos)
                    buf += f.read()
                    pos = f.tell()
                *done, buf = buf.split("\n")
                now = time.time()
                self.lines += [(now, line) for line in done]
            time.sleep(0.1)

    def stop(self):
        time.sleep(0.5)
        self._stop.set()
        self._thread.join()

    def first(self, text: str, after: float = 0.0):
        return next(((t, x) for t, x in self.lines if text in x and t >= after), (None, None))


def losses(save: Path) -> dict[int, float]:
    out = {}
    for line in (save / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["iteration"]] = rec["loss"]
    return out


def run_job(cluster, work: Path, overrides: list[str], timeout: float) -> tuple[dict, LogWatch, Path]:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    save = work / "ckpt"
    env = {"DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MAX_REQUEUES": "3",
           "PYTHONPATH": str(REPO)}
    job = cluster.sbatch([*ALLOC, str(REPO / "slurm" / "cpt.sh"), "examples/tiny/cpt.yaml",
                          f"checkpoint.save={save}", *overrides], cwd=work, env=env)
    watch = LogWatch(work / "logs" / f"apriel-cpt-{job}.out")
    info = cluster.wait(job, timeout=timeout)
    watch.stop()
    return info, watch, save


def measure(kind: str, info: dict, watch: LogWatch, save: Path, ref: dict) -> dict:
    t_fault, _ = watch.first(FAULT_LINE[kind])
    t_detect, _ = watch.first(DETECT_LINE[kind], after=t_fault or 0)
    row = {"fault": kind, "job": f"{info['JobState']} {info['ExitCode']}, restarts {info.get('Restarts')}",
           "detected_s": None if t_fault is None or t_detect is None else t_detect - t_fault,
           "restarted_s": None, "recomputed": None, "equal": None}
    if t_fault is None:
        return row
    steps_before = [int(m.group(1)) for t, x in watch.lines if t <= t_fault and (m := re.match(r"step (\d+)/", x))]
    t_resume, line = watch.first("resumed from", after=t_fault)
    if t_resume is not None:
        resumed_at = int(re.search(r"iteration (\d+)", line).group(1))
        t_step, _ = watch.first(f"step {resumed_at + 1}/", after=t_resume)
        row["restarted_s"] = None if t_step is None else t_step - t_fault
        row["recomputed"] = max(steps_before, default=0) - resumed_at
    if (save / "logs" / "metrics.jsonl").exists() and info["JobState"] == "COMPLETED":
        got = losses(save)
        row["equal"] = "yes" if got == ref else f"no ({sum(got.get(k) != v for k, v in ref.items())} steps differ)"
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-timeout", type=float, default=10)
    ap.add_argument("--kinds", default=",".join(DRILLS), help="comma-separated drills to run")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per job, requeues included")
    args = ap.parse_args()
    if missing_binaries() or os.geteuid() != 0:
        print("error: needs root and Debian's slurm packages (slurmctld slurmd slurm-client munge)", file=sys.stderr)
        return 2
    common = [f"train.train_iters={args.steps}", "checkpoint.save_interval=5", "logging.log_interval=1",
              "logging.eval_interval=null", f"fault.step_timeout={args.step_timeout}", "fault.startup_timeout=600",
              "fault.save_timeout=120", "fault.straggler_factor=1.5"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="apriel-faults-") as tmp, SlurmCluster(Path(tmp) / "slurm") as cluster:
        t0 = time.time()
        info, watch, save = run_job(cluster, Path(tmp) / "none", common, args.timeout)
        if info["JobState"] != "COMPLETED":
            print(f"error: the run without a fault ended {info['JobState']}", file=sys.stderr)
            return 1
        ref = losses(save)
        print(f"no fault: {args.steps} steps, {time.time() - t0:.0f} s wall (job start to end)", flush=True)
        for kind in args.kinds.split(","):
            rank, step, extra = DRILLS[kind]
            drill = json.dumps([{"rank": rank, "step": step, "kind": kind, **extra}]).replace(" ", "")
            info, watch, save = run_job(cluster, Path(tmp) / kind, [*common, f"fault.inject={drill}"], args.timeout)
            rows.append(measure(kind, info, watch, save, ref))
            print(json.dumps(rows[-1]), flush=True)

    def f(x):
        return "-" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))

    print(f"\n2 tasks (DP=2, CPU, gloo), {args.steps} steps, checkpoint every 5, fault.step_timeout "
          f"{args.step_timeout:g} s\n")
    print("| fault | detected after (s) | restarted after (s) | steps recomputed | final losses equal | job |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {f(r['detected_s'])} | {f(r['restarted_s'])} | {f(r['recomputed'])} | "
              f"{f(r['equal'])} | {r['job']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
