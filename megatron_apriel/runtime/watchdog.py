"""Progress watchdog and heartbeats: a rank that stops making progress ends the job in minutes.

Without this, one frozen rank (a dead NIC, a GPU off the bus, a deadlocked data worker) leaves every
other rank waiting inside a collective until the process-group timeout, and the job then dies with a
traceback that names neither the rank nor the node that stopped. Here the main thread reports the
phase it enters (start-up, data, step, save, load, eval) and a daemon thread checks it against the
phase's budget. On overrun the thread:

1. writes every thread's Python stack (``faulthandler``) to stderr, headed by rank and node;
2. reads the other ranks' heartbeats (phase, step, when the phase began, when the heartbeat was
   published) from the rendezvous store and names the ranks that are behind or silent, e.g.
   ``rank 1 on n2: last heartbeat 95 s ago in step 17; ranks 0 waiting in step 18 for 61 s``;
3. exits the process with :data:`megatron_apriel.errors.EXIT_HANG` (``os._exit``: the main thread
   is stuck, so nothing else would run).

Heartbeats are published by the watchdog thread, not the main thread, every ``heartbeat_s``: a rank
whose main thread is blocked in a collective still shows as alive and "waiting in step N"; a rank
that is frozen as a whole (SIGSTOP, a kernel hang) stops publishing and shows as silent. The store
is torch.distributed's own (the rendezvous TCPStore: torchrun's agent, or rank 0 under ``srun``),
so no extra service and no files on the shared file system. Reading it is bounded by a timeout: if
the store's host is the rank that froze, the report says the store did not answer.

Hand-written because nvidia-resiliency-ext (Megatron-LM's in-job restart and hang detection) is a
CUDA-only dependency with its own launcher; this needs only threads and the store torch already has.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_apriel.errors import EXIT_HANG

KEY = "apriel_heartbeat/"
# the order of phases within one step, to tell which rank is behind when all are at the same step
PHASE_ORDER = {"startup": 0, "load": 1, "data": 2, "step": 3, "eval": 4, "save": 5, "done": 6}


@dataclass
class Heartbeat:
    rank: int
    host: str
    phase: str
    step: int
    since: float  # time.time() when the phase began
    published: float  # time.time() of this heartbeat

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @staticmethod
    def from_json(text) -> "Heartbeat":
        return Heartbeat(**json.loads(text))


def culprits(beats: dict[int, Heartbeat], world: int, now: float, stale_s: float) -> list[int]:
    """The ranks :func:`culprit_report` names: silent, missing, or behind the others."""
    line = culprit_report(beats, world, now, stale_s)
    silent = [r for r, b in beats.items() if now - b.published > stale_s]
    missing = [r for r in range(world) if r not in beats]
    behind = [r for r in beats if f"rank {r} on {beats[r].host}: behind" in line]
    return sorted(set(silent + missing + behind))


def culprit_report(beats: dict[int, Heartbeat], world: int, now: float, stale_s: float) -> str:
    """One line naming the ranks that are behind (silent, or at an earlier step/phase) and where the
    others wait, from every rank's last heartbeat. ``stale_s``: a heartbeat older than this is silent."""
    missing = [r for r in range(world) if r not in beats]
    silent = sorted(r for r, b in beats.items() if now - b.published > stale_s)
    alive = {r: b for r, b in beats.items() if r not in silent}
    parts = []
    for r in silent:
        b = beats[r]
        parts.append(f"rank {r} on {b.host}: last heartbeat {now - b.published:.0f} s ago in {b.phase} "
                     f"of step {b.step}")
    if missing:
        parts.append(f"ranks {_ranks(missing)}: no heartbeat at all")
    if alive:
        key = {r: (b.step, PHASE_ORDER.get(b.phase, 9)) for r, b in alive.items()}
        lowest = min(key.values())
        behind = sorted(r for r in alive if key[r] == lowest) if len(set(key.values())) > 1 else []
        for r in behind:
            b = alive[r]
            parts.append(f"rank {r} on {b.host}: behind, in {b.phase} of step {b.step} for {now - b.since:.0f} s")
        groups: dict[tuple, list[int]] = {}
        for r, b in alive.items():
            if r not in behind:
                groups.setdefault((b.phase, b.step), []).append(r)
        for (phase, step), ranks in sorted(groups.items(), key=lambda kv: kv[0][1]):
            oldest = min(alive[r].since for r in ranks)
            parts.append(f"ranks {_ranks(ranks)} waiting in {phase} of step {step} for {now - oldest:.0f} s")
    if not silent and not missing and not any("behind" in p for p in parts):
        parts.append("no rank is behind the others: see the stacks above for where they wait")
    return "; ".join(parts)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, sorted(ranks)))


class Watchdog:
    """Watches the phases the main thread reports; see the module docstring.

    ``budgets`` maps a phase name to its budget in seconds (missing or 0: not watched). ``store``
    is a torch.distributed Store (or None: no heartbeats, the report names only this rank).
    """

    def __init__(self, budgets: dict[str, float], rank: int = 0, world: int = 1, store=None,
                 heartbeat_s: float = 2.0, exit_code: int = EXIT_HANG, log: Callable[[str], None] = None,
                 exit_fn: Callable[[int], None] = os._exit, on_fire: Optional[Callable[[dict], None]] = None):
        self.budgets = dict(budgets)
        self.rank, self.world, self.store = rank, world, store
        self.host = socket.gethostname()
        self.heartbeat_s = heartbeat_s
        self.exit_code = exit_code
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.exit_fn = exit_fn
        self.on_fire = on_fire  # called with what was found (for the launcher's account) before exiting
        self._phase, self._step, self._since = "startup", 0, time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fired: Optional[str] = None
        self._thread = threading.Thread(target=self._run, name="apriel-watchdog", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- main thread
    def phase(self, name: str, step: Optional[int] = None) -> None:
        """Enter phase ``name`` (at ``step``; default: the current one): its budget starts now."""
        with self._lock:
            self._phase, self._since = name, time.time()
            if step is not None:
                self._step = step

    def stop(self) -> None:
        self.phase("done")
        self._stop.set()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------ watchdog thread
    def _beat(self) -> Heartbeat:
        with self._lock:
            return Heartbeat(self.rank, self.host, self._phase, self._step, self._since, time.time())

    def _publish(self) -> None:
        if self.store is None:
            return
        try:
            self.store.set(f"{KEY}{self.rank}", self._beat().to_json())
        except Exception:  # a store that went away (rank 0 gone) must not kill the watchdog
            pass

    def _run(self) -> None:
        last_pub = 0.0
        while not self._stop.wait(0.2):
            now = time.time()
            if now - last_pub >= self.heartbeat_s:
                self._publish()
                last_pub = now
            b = self._beat()
            budget = self.budgets.get(b.phase) or 0
            if budget > 0 and now - b.since > budget:
                self._fire(b, budget)
                return

    def _read_beats(self, timeout: float) -> Optional[dict[int, Heartbeat]]:
        """Every rank's last heartbeat, or None when the store does not answer within ``timeout``."""
        out: dict[int, Heartbeat] = {}

        def read():
            for r in range(self.world):
                key = f"{KEY}{r}"
                if self.store.check([key]):
                    out[r] = Heartbeat.from_json(self.store.get(key).decode())

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        return None if t.is_alive() else out

    def _fire(self, b: Heartbeat, budget: float) -> None:
        head = (f"fault: rank {self.rank} on {self.host}: {b.phase} of step {b.step} has run "
                f"{time.time() - b.since:.0f} s > its budget of {budget:g} s")
        self.log(f"{head}; the Python stacks of every thread of rank {self.rank} follow")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        hosts, step = [self.host], b.step
        if self.store is not None and self.world > 1:
            self._publish()
            beats = self._read_beats(timeout=10)
            if beats is None:
                report = ("the heartbeat store did not answer in 10 s (its host, rank 0 under srun, may be "
                          "the one stuck)")
            else:
                now, stale = time.time(), max(3 * self.heartbeat_s, 5)
                report = culprit_report(beats, self.world, now, stale_s=stale)
                hosts = sorted({beats[r].host for r in culprits(beats, self.world, now, stale) if r in beats})
                step = max(x.step for x in beats.values())
        else:
            report = f"rank {self.rank} on {self.host} is the only rank"
        self.fired = report
        self.log(f"fault: hang detected: {report}")
        if self.on_fire is not None:
            try:
                self.on_fire({"kind": "hang", "time": time.time(), "detected_after_s": round(time.time() - b.since, 1),
                              "step": step, "culprit_hosts": hosts, "report": report})
            except Exception as e:  # the account is a courtesy; the exit must happen
                self.log(f"fault: could not write the fault report: {e}")
        self.log(f"fault: rank {self.rank} exits with code {self.exit_code} (hang); resume from the last checkpoint")
        sys.stdout.flush()
        sys.stderr.flush()
        self.exit_fn(self.exit_code)


def default_store():
    """torch.distributed's store of the default process group (the rendezvous TCPStore), or None."""
    import torch

    if not torch.distributed.is_initialized():
        return None
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except Exception:
        return None
