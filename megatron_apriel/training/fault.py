"""Faults of a long run, each ended or survived in minutes: the ``fault:`` section and its machinery.

What the training loop calls (small hooks; the logic lives here):

- :class:`Faults` owns the progress watchdog (:mod:`megatron_apriel.runtime.watchdog`: phase budgets
  ``fault.startup_timeout`` / ``step_timeout`` / ``save_timeout``, heartbeats, the culprit report,
  exit code 4) and the orphan guardian (:mod:`megatron_apriel.runtime.guardian`);
- non-finite loss or gradients: :meth:`Faults.check_step` stops (exit 1, nothing saved) or, with
  ``train.nan_policy: skip``, skips the update up to ``train.nan_skip_limit`` times;
- the straggler report: each rank's compute time per step (from the step's start to the moment it
  enters gradient reduction, so time spent waiting for other ranks is not counted) is gathered every
  log interval; ranks slower than ``fault.straggler_factor`` x the median are named with their node;
- disk space: a warning before a save that will not fit (the last checkpoint's size from its
  manifest), and a disk-full error naming folder, space needed and free, and the intact iteration;
- verified resume: the newest checkpoint that matches its manifest (:mod:`..checkpoint.manifest`);
- drills: ``fault.inject`` makes a rank hang, slow down, crash, produce NaN gradients or corrupt
  the checkpoint it just saved, to rehearse the above on a real cluster before a long run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_apriel.checkpoint.dcp_io import iter_dir, read_latest
from megatron_apriel.checkpoint.manifest import checkpoint_bytes, newest_verified
from megatron_apriel.config import ConfigError, atomic_write_text
from megatron_apriel.errors import RunError
from megatron_apriel.runtime import guardian
from megatron_apriel.runtime.log import log0
from megatron_apriel.runtime.watchdog import Watchdog, default_store

INJECT_KINDS = ("hang", "slow", "crash", "nan", "corrupt-checkpoint")


@dataclass
class InjectSpec:
    """One drill: on ``rank`` at ``step``, do ``kind`` (``slow``: sleep ``seconds`` in every step
    from ``step`` on). Fired once per run: a marker in ``<save>/fault_drills/`` keeps the requeued
    run from repeating it."""

    rank: int = 0
    step: int = 1
    kind: str = "hang"
    seconds: float = 1.0

    def validate(self):
        if self.kind not in INJECT_KINDS:
            raise ConfigError(f"fault.inject.kind: {self.kind!r} is not one of {', '.join(INJECT_KINDS)}")
        if self.step < 1 or self.rank < 0:
            raise ConfigError(f"fault.inject: step must be >= 1 and rank >= 0, got step {self.step} rank {self.rank}")

    @property
    def name(self) -> str:
        return f"{self.kind}-rank{self.rank}-step{self.step}"


@dataclass
class FaultConfig:
    """Budgets in seconds for each phase of a rank (0: not watched); see the README, "When things
    go wrong". The defaults suit a 15B run on a few nodes: start-up covers the rendezvous, a blend
    index build over tens of billions of tokens and a checkpoint load; a step of seconds to a minute
    (the first one gets the start-up budget: compilation, allocator warm-up); a save of ~200 GB of
    model and optimizer state to a parallel file system."""

    startup_timeout: float = 1800.0
    step_timeout: float = 600.0
    save_timeout: float = 1800.0
    straggler_factor: float = 1.5  # 0: no straggler report
    heartbeat_interval: float = 2.0
    # CRC32 of every checkpoint file in its manifest, not only of the small ones (costs a read of
    # the whole checkpoint per save); sizes catch missing and truncated files
    checksum_all: bool = False
    inject: list[InjectSpec] = field(default_factory=list)

    def validate(self):
        for key in ("startup_timeout", "step_timeout", "save_timeout", "straggler_factor"):
            if getattr(self, key) < 0:
                raise ConfigError(f"fault.{key}: must be >= 0 (0 turns it off), got {getattr(self, key)}")
        if self.heartbeat_interval <= 0:
            raise ConfigError(f"fault.heartbeat_interval: must be > 0, got {self.heartbeat_interval}")
        if 0 < self.straggler_factor <= 1:
            raise ConfigError(f"fault.straggler_factor: must be > 1 (or 0: off), got {self.straggler_factor}")


def process_group_timeout_minutes(fc: FaultConfig) -> float:
    """The process-group timeout: longer than every watchdog budget, so the watchdog (which names
    the culprit) always fires first; 30 minutes when every budget is off."""
    budgets = [b for b in (fc.startup_timeout, fc.step_timeout, fc.save_timeout) if b > 0]
    if not budgets:
        return 30.0
    return (max(budgets) * 1.25 + 60) / 60


def _enospc(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == 28:
            return True
        text = str(e)
        if "No space left on device" in text or "[Errno 28]" in text or "errno 28" in text.lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _size(n: Optional[float]) -> str:
    if n is None:
        return "unknown"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


_LIVE: list["Faults"] = []


def close_all() -> None:
    """Stop the watchdog of every run of this process that did not reach :meth:`Faults.close` (a
    build or run that raised): in a process that goes on (a test, a notebook) a forgotten watchdog
    would end it with exit 4 once its budget ran out."""
    for f in list(_LIVE):
        f.close()


class Faults:
    """The loop's fault handling for one run (see the module docstring)."""

    def __init__(self, fc: FaultConfig, save_root: Optional[str], nan_policy: str = "stop", nan_skip_limit: int = 10):
        self.fc, self.save_root = fc, save_root
        self.nan_policy, self.nan_skip_limit = nan_policy, nan_skip_limit
        self.skipped: list[int] = []
        self.guardian = guardian.start()
        self.watchdog = Watchdog(self._budgets(first_step=True), log=self._log, on_fire=write_fault_report)
        self.rank, self.world, self.hosts = 0, 1, [socket.gethostname()]
        self._compute: list[float] = []
        self._t0 = self._entered_reduce = None
        self._first_step = True
        self.last_ckpt_bytes: Optional[int] = None
        _LIVE.append(self)

    def _budgets(self, first_step: bool = False) -> dict[str, float]:
        fc = self.fc
        step = max(fc.step_timeout, fc.startup_timeout) if first_step and fc.step_timeout else fc.step_timeout
        return {"startup": fc.startup_timeout, "load": fc.save_timeout, "data": step, "step": step,
                "eval": step, "save": fc.save_timeout}

    def _log(self, msg: str) -> None:
        print(msg, flush=True)

    # ------------------------------------------------------------------ start-up
    def distributed_ready(self) -> None:
        """After init_distributed: heartbeats through the rendezvous store, every rank's node."""
        if not torch.distributed.is_initialized():
            return
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        hosts = [None] * self.world
        torch.distributed.all_gather_object(hosts, socket.gethostname())
        self.hosts = hosts
        w = self.watchdog
        w.rank, w.world, w.store, w.heartbeat_s = self.rank, self.world, default_store(), self.fc.heartbeat_interval

    def phase(self, name: str, step: Optional[int] = None) -> None:
        self.watchdog.phase(name, step)

    def resumed(self, iteration: int) -> None:
        """After a resume under a launcher that recorded a fault: how many steps it cost."""
        report = read_fault_report()
        if not report or self.rank != 0:
            return
        hosts = ", ".join(report.get("culprit_hosts") or []) or "unknown node"
        lost = (f"{max(report['step'] - iteration, 0)} steps recomputed (the fault was at step {report['step']})"
                if report.get("step") else "the steps since it are recomputed")
        log0(f"restart after {report.get('kind', 'a fault')} on {hosts}: resumed at iteration {iteration}, {lost}, "
             f"{time.time() - float(report.get('time', time.time())):.0f} s after the fault was detected")

    def resume_folder(self) -> Optional[str]:
        """The newest verified checkpoint of ``checkpoint.save`` (rank 0 checks, every rank agrees)."""
        if not self.save_root:
            return None
        pick = [None]
        if self.rank == 0:
            try:
                pick[0] = ("ok", newest_verified(self.save_root, log=self._log))
            except RunError as e:
                pick[0] = ("error", str(e))
        if self.world > 1:
            torch.distributed.broadcast_object_list(pick, src=0)
        status, value = pick[0]
        if status == "error":
            raise RunError(value)
        if value is not None:
            self.last_ckpt_bytes = checkpoint_bytes(value)
        return value

    # ------------------------------------------------------------------ steps
    def install_compute_timer(self, ddp) -> None:
        """Time each step's own work: wrap the gradient finalisation the schedules call, whose
        entry is the first point where a rank waits for the others (DP reduction)."""
        config = ddp[0].config
        inner = config.finalize_model_grads_func

        def timed(*args, **kwargs):
            if self._entered_reduce is None:
                self._entered_reduce = time.perf_counter()
            return inner(*args, **kwargs)

        config.finalize_model_grads_func = timed

    def start_step(self, step: int) -> None:
        """Before the step's data is fetched: the drills that act there, and the compute timer."""
        if not self._first_step:
            self.watchdog.budgets = self._budgets()
        self._first_step = False
        self.phase("data", step)
        self._t0, self._entered_reduce = time.perf_counter(), None
        for spec in self._drills(step, ("hang", "slow", "crash")):
            if spec.kind == "slow":
                if step == spec.step:
                    self._log(f"fault drill: rank {self.rank} slows down by {spec.seconds:g} s per step "
                              f"from step {step}")
                time.sleep(spec.seconds)
                continue
            self._mark(spec)
            if spec.kind == "hang":
                self._log(f"fault drill: rank {self.rank} hangs at step {step}")
                while True:
                    time.sleep(3600)
            self._log(f"fault drill: rank {self.rank} crashes (SIGKILL) at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)

    def computing(self, step: int) -> None:
        self.phase("step", step)

    def after_backward(self, step: int):
        """The hook train_step calls after backward (the ``nan`` drill), or None."""
        drills = self._drills(step, ("nan",))
        if not drills:
            return None

        def poison(chunks):
            self._mark(drills[0])
            self._log(f"fault drill: rank {self.rank} makes its gradients NaN at step {step}")
            for chunk in chunks:
                for buf in chunk.buffers + chunk.expert_parallel_buffers:
                    buf.grad_data.fill_(float("nan"))

        return poison

    def end_step(self, step: int, result) -> bool:
        """After the step: record compute time; act on non-finite values. True: the update was
        skipped (nan_policy skip); raises RunError (exit 1, nothing saved) to stop."""
        if self._t0 is not None:
            end = self._entered_reduce if self._entered_reduce is not None else time.perf_counter()
            self._compute.append(end - self._t0)
        what = getattr(result, "nonfinite", None)
        if not what:
            return False
        latest = read_latest(self.save_root) if self.save_root else None
        intact = f"the last checkpoint is iteration {latest}" if latest is not None else "no checkpoint was saved"
        if self.nan_policy == "skip" and len(self.skipped) < self.nan_skip_limit:
            self.skipped.append(step)
            log0(f"WARNING: non-finite {what} at step {step}: update skipped ({len(self.skipped)} of "
                 f"train.nan_skip_limit {self.nan_skip_limit})")
            return True
        why = (f"after skipping {len(self.skipped)} steps (train.nan_skip_limit {self.nan_skip_limit}: "
               f"steps {', '.join(map(str, self.skipped))})" if self.nan_policy == "skip" else
               "(train.nan_policy: stop)")
        raise RunError(f"non-finite {what} at step {step} {why}: stopping without saving; {intact}")

    def straggler_report(self, step: int) -> Optional[dict]:
        """Every rank's mean compute time per step since the last report; ranks slower than
        ``straggler_factor`` x the median are named (log line on rank 0). A collective: every rank
        calls it at the same steps. Returns metrics for the writer, or None when off."""
        if not self.fc.straggler_factor or not self._compute:
            self._compute = []
            return None
        mine = torch.tensor([sum(self._compute) / len(self._compute)], dtype=torch.float64)
        self._compute = []
        if self.world > 1:
            allt = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world)]
            torch.distributed.all_gather(allt, mine)
            times = [float(t) for t in allt]
        else:
            times = [float(mine)]
        med = statistics.median(times)
        slow = [(r, t) for r, t in enumerate(times) if med > 0 and t > self.fc.straggler_factor * med]
        if slow:
            names = ", ".join(f"rank {r} on {self.hosts[r]} {t:.3f} s/step ({t / med:.1f}x)" for r, t in slow)
            log0(f"stragglers at step {step} (compute > {self.fc.straggler_factor}x the median "
                 f"{med:.3f} s/step): {names}")
        return {"perf/compute_s_median": med, "perf/compute_s_max": max(times),
                "perf/straggler_ratio": max(times) / med if med > 0 else 1.0, "perf/stragglers": len(slow),
                "stragglers": [{"rank": r, "host": self.hosts[r], "compute_s": t} for r, t in slow]}

    # ------------------------------------------------------------------ saves
    def save(self, checkpointer, iteration: int, *args) -> None:
        """``checkpointer.save`` under the save budget, with the disk checks and the drill."""
        if not self.save_root:
            return
        self.phase("save", iteration)
        need = self.last_ckpt_bytes
        free = shutil.disk_usage(self.save_root).free if os.path.isdir(self.save_root) else None
        if need is not None and free is not None and free < need:
            log0(f"WARNING: {self.save_root} has {_size(free)} free, the last checkpoint took {_size(need)}: "
                 f"the save of iteration {iteration} will likely not fit")
        try:
            checkpointer.save(iteration, *args)
        except BaseException as e:  # torch's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            # torch's writer reports a full disk as "enforce fail at inline_container.cc ... unexpected
            # pos", with no errno: judge by the space left once the write failed
            usage = shutil.disk_usage(self.save_root)
            if not (_enospc(e) or usage.free < 0.02 * usage.total or (need and usage.free < need)):
                raise
            self._disk_full(iteration, need)
        if checkpointer.last_bytes is not None:
            self.last_ckpt_bytes = checkpointer.last_bytes
        for spec in self._drills(iteration, ("corrupt-checkpoint",), at_or_after=True):
            checkpointer.finalize(blocking=True)
            self._mark(spec)
            self._corrupt(iter_dir(self.save_root, iteration))
            os.kill(os.getpid(), signal.SIGKILL)

    def _disk_full(self, iteration: int, need: Optional[int]) -> None:
        folder = iter_dir(self.save_root, iteration)
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # never resumable; frees what it took
        free = shutil.disk_usage(self.save_root).free
        latest = read_latest(self.save_root)
        intact = (f"the last intact checkpoint is iteration {latest} ({iter_dir(self.save_root, latest)})"
                  if latest is not None else "no checkpoint is intact")
        raise RunError(f"disk full while saving iteration {iteration} to {self.save_root}: a checkpoint needs "
                       f"about {_size(need)} (the last one's size), {_size(free)} free after removing the partial "
                       f"{os.path.basename(folder)}; {intact}; free space and run again to resume") from None

    def _corrupt(self, folder: str) -> None:
        files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".distcp")]
        victim = max(files, key=os.path.getsize)
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
        self._log(f"fault drill: rank {self.rank} cut {victim} in half, then crashes (SIGKILL)")

    # ------------------------------------------------------------------ drills
    def _marker(self, spec: InjectSpec) -> Optional[str]:
        return os.path.join(self.save_root, "fault_drills", spec.name) if self.save_root else None

    def _mark(self, spec: InjectSpec) -> None:
        marker = self._marker(spec)
        if marker:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "w") as f:
                f.write(f"{time.time()}\n")

    def _drills(self, step: int, kinds: tuple, at_or_after: bool = False) -> list[InjectSpec]:
        out = []
        for spec in self.fc.inject:
            if spec.kind not in kinds or spec.rank != self.rank:
                continue
            hit = step >= spec.step if (at_or_after or spec.kind == "slow") else step == spec.step
            if not hit:
                continue
            marker = self._marker(spec)
            if spec.kind != "slow" and marker and os.path.exists(marker):
                continue
            out.append(spec)
        return out

    def close(self) -> None:
        self.watchdog.stop()
        if self in _LIVE:
            _LIVE.remove(self)


def write_fault_report(report: dict) -> None:
    """What a fault was, for the SLURM launcher's one-line account and its node exclusion: written to
    ``$APRIEL_FAULT_REPORT`` (set by slurm/common.sh) when set."""
    path = os.environ.get("APRIEL_FAULT_REPORT")
    if path:
        atomic_write_text(path, json.dumps(report) + "\n")


def read_fault_report() -> Optional[dict]:
    """The previous run's report (``$APRIEL_FAULT_PREV``, where the launcher moved it on restart)."""
    path = os.environ.get("APRIEL_FAULT_PREV")
    try:
        return json.loads(open(path).read()) if path else None
    except (OSError, ValueError):
        return None


def check_nan_policy(policy: str, limit: int) -> None:
    if policy not in ("stop", "skip"):
        raise ConfigError(f"train.nan_policy: {policy!r} is not one of stop, skip")
    if limit < 0:
        raise ConfigError(f"train.nan_skip_limit: must be >= 0, got {limit}")
