"""A stop request: checkpoint at the next step boundary and exit 3, so SLURM requeues the job.

Training (``training/loop.py``) and GRPO (``rl/grpo.py``) take a stop the same way, here: a signal
to this process, or the file named by ``APRIEL_STOP_FILE`` appearing (``slurm/grpo.sh`` creates it
on SLURM's time-limit signal: under ``accelerate launch`` the trainers are grandchildren of the task,
out of reach of a signal to it). Ranks may see the request at different steps, so it is reduced over
ranks at every step boundary and all of them stop at the same one; the caller passes the reduction of
its own world (torch.distributed for training, the accelerator for GRPO).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Iterable

STOP_FILE_ENV = "APRIEL_STOP_FILE"


class StopRequest:
    """Set by ``signals`` (handlers only where Python allows them: the main thread) or the stop file."""

    def __init__(self, signals: Iterable[signal.Signals]):
        self.signalled = None  # the signal number that asked, if one did
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signalled = signum

    def ask(self, signum: int = signal.SIGUSR1) -> None:
        """Ask for a stop from inside the process (as the signal would)."""
        self.signalled = signum

    def asked_here(self) -> bool:
        stop_file = os.environ.get(STOP_FILE_ENV, "")
        return bool(self.signalled) or bool(stop_file and os.path.exists(stop_file))

    def any_rank(self, reduce_max: Callable[[bool], bool]) -> bool:
        """Whether any rank was asked: ``reduce_max`` takes this rank's answer and returns the world's."""
        return reduce_max(self.asked_here())

    def reason(self) -> str:
        return "signal" if self.signalled else "stop file"
