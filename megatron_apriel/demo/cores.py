"""How the demo spreads its work over the cores it is given.

Two ways, chosen per stage by measurement on 2 cores (see ``recipe.py``'s ``Demo.run_stages``):

* a training run is data-parallel over the cores (``torch.distributed.run``, gloo, one process
  per core, each on its slice of the same global batch, so the run learns what one process
  learns: the losses of one and two processes agree to 5 digits);
* independent work runs side by side in forked children, one core each: the two specialist
  fine-tunes, and an evaluation beside the next single-process stage (GRPO, the final merge).

A fork, not a new interpreter: the child inherits the imported torch, transformers and
lm-evaluation-harness (a fresh ``python`` spends about 5 s of CPU importing them). The parent
holds no thread pool that a fork could leave locked: every process of the demo runs one thread
(``recipe.THREADS``), and the tokenizers' Rust pool is off (``TOKENIZERS_PARALLELISM``).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from typing import Callable, Optional

from megatron_apriel.errors import AprielError


def given_cores() -> int:
    """The cores this process may run on (``taskset``, cgroup cpusets), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS): the machine's count
        return max(1, os.cpu_count() or 1)


def data_parallel(cores: int, micro_batch: int) -> tuple[int, int]:
    """(processes, micro-batch per process) on ``cores``: the most processes, at most one per core,
    that split the one-process micro-batch evenly, so a step sees the same global batch in the same
    number of micro-batch rounds (the learning does not change)."""
    n = next(n for n in range(min(cores, micro_batch), 0, -1) if micro_batch % n == 0)
    return n, micro_batch // n


def launcher(processes: int) -> list[str]:
    """The command prefix that starts ``-m module`` on ``processes`` processes of this machine."""
    if processes <= 1:
        return [sys.executable]
    # --standalone: a rendezvous on a free local port, so two demos (or a test beside one) never clash
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


class _Prefixed:
    """stdout of a child: each line starts with its label, so lines of side-by-side work stay apart."""

    def __init__(self, stream, label: str):
        self.stream, self.label, self.at_start = stream, label, True

    def write(self, text: str) -> int:
        for part in text.splitlines(keepends=True):
            if self.at_start:
                self.stream.write(f"[{self.label}] ")
            self.stream.write(part)
            self.at_start = part.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class Forked:
    """``fn()`` in a forked child while the caller goes on; ``result()`` waits and returns what
    ``fn`` returned (a picklable value) or raises ``error(label, message)``. Where fork is not
    available, ``fn`` runs at once, in this process."""

    def __init__(self, fn: Callable[[], object], label: str, error: Callable[[str, str], Exception]):
        self.label, self.error = label, error
        self.proc: Optional[multiprocessing.Process] = None
        if not can_fork():
            self.value = fn()
            return
        ctx = multiprocessing.get_context("fork")
        self.conn, child_conn = ctx.Pipe(duplex=False)
        sys.stdout.flush()
        sys.stderr.flush()
        self.proc = ctx.Process(target=_child, args=(fn, child_conn, label), name=f"demo-{label}")
        self.proc.start()
        child_conn.close()

    def result(self):
        if self.proc is None:
            return self.value
        try:
            status, value = self.conn.recv()
        except EOFError:  # the child died without a word (killed, out of memory)
            status, value = "error", "it ended without a result"
        self.proc.join()
        self.conn.close()
        self.proc = None
        if status != "ok":
            raise self.error(self.label, value)
        self.value = value
        return value


def _child(fn: Callable[[], object], conn, label: str) -> None:
    sys.stdout = _Prefixed(sys.stdout, label)
    try:
        value = fn()
        status = "ok"
    except BaseException as e:  # noqa: BLE001  (the parent reports it, naming the work)
        # the project's errors say what went wrong in their message; anything else needs its traceback
        status, value = "error", str(e) if isinstance(e, AprielError) else traceback.format_exc()
    sys.stdout.flush()
    conn.send((status, value))
    conn.close()
    os._exit(0)  # no atexit handlers or finalizers of the parent's objects in the child
