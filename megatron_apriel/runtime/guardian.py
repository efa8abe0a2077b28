"""No orphans: end every helper process of a trainer within seconds of the trainer's death.

A trainer killed with SIGKILL (the OOM killer, a user, torchrun tearing down a failed group) leaves
its helpers reparented to init, holding memory and sometimes GPU memory: megatron-core's async
checkpoint writer, multiprocessing's resource tracker, DataLoader workers, reward workers. SLURM's
cgroups reap them at the end of a job, but torchrun and interactive runs do not.

``PR_SET_PDEATHSIG`` would need code in each child as it starts; the resource tracker and spawned
workers are started by ``exec`` and run none of ours. So :func:`start` forks one small watcher (this
file run as a script: no torch import, a few MB) that records the trainer's descendants every
``POLL_S`` and, once the trainer is gone, gives them ``GRACE_S`` to exit on their own (the resource
tracker cleans shared memory then), sends SIGTERM, and SIGKILL to what is left ``GRACE_S`` later.
It then exits itself. It also runs when the trainer exits normally: nothing is left to end then.

psutil checks each process's creation time before signalling, so a recycled pid is never hit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 0.25
GRACE_S = 1.0


_WATCHERS: dict[int, subprocess.Popen] = {}


def start(pid: int | None = None) -> subprocess.Popen:
    """Start the watcher of ``pid`` (default: this process); returns its Popen.

    One watcher per watched process: a process that trains several times (the demo's stages, a
    notebook, a test session) keeps the one it started first, instead of gathering a watcher per run."""
    pid = os.getpid() if pid is None else pid
    running = _WATCHERS.get(pid)
    if running is not None and running.poll() is None:
        return running
    _WATCHERS[pid] = subprocess.Popen([sys.executable, "-S", os.path.abspath(__file__), str(pid)],
                                      stdin=subprocess.DEVNULL, close_fds=True,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    return _WATCHERS[pid]


def _watch(pid: int) -> None:
    import psutil

    me = os.getpid()
    try:
        trainer = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    known: dict[int, psutil.Process] = {}
    while trainer.is_running() and trainer.status() != psutil.STATUS_ZOMBIE and os.getppid() == pid:
        try:
            for p in trainer.children(recursive=True):
                if p.pid != me and p.pid not in known:
                    known[p.pid] = p
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    for sig in (None, "terminate", "kill"):
        left = [p for p in known.values() if _alive(p)]
        for p in left if sig else []:
            try:
                getattr(p, sig)()
            except psutil.Error:
                pass
        deadline = time.monotonic() + GRACE_S
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [p for p in left if _alive(p)]
        if not left:
            return


def _alive(p) -> bool:
    """Running and not a zombie (an orphan's zombie waits for init to reap it; it holds nothing)."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    # Detached from the trainer's terminal signals (Ctrl-C reaches the trainer, which ends helpers
    # itself; this watcher must outlive it to act).
    os.setsid()
    _watch(int(sys.argv[1]))
