"""How the demo spreads its work over the cores it is given.

Two ways, chosen per stage by measurement on 2 cores (see ``recipe.py``'s ``Demo.run_stages``):

* a training run is data-parallel over the cores (``torch.distributed.run``, gloo, one process
  per core, each on its slice of the same global batch, so the run learns what one process
  learns: the losses of one and two processes agree to 5 digits);
* independent work runs side by side in forked children, one core each: the two specialist
  fine-tunes, and an evaluation beside the next single-process stage (GRPO, the final merge).

A fork, not a new interpreter: the child inherits the imported torch, megatron-core,
transformers and lm-evaluation-harness (a fresh ``python`` spends about 5 s of CPU importing
megatron-core alone, each rank of each training run). The training ranks are forked too (``Ranks``,
the world ``torchrun`` would make), which needs a parent that never joined a torch.distributed
world: the demo runs its in-process tools (conversion, averaging) in forked children as well. The parent
holds no thread pool that a fork could leave locked: every process of the demo runs one thread
(``recipe.THREADS``), and a child does not use the tokenizers' Rust pool (``TOKENIZERS_PARALLELISM``).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Iterator, Optional

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


class Ranks:
    """``main(argv)`` of a training tool on ``processes`` forked processes that form one
    torch.distributed world, as ``torchrun --standalone --nproc-per-node=processes`` would start
    them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). ``lines()`` yields their merged output,
    ``wait()`` their exit status: the first failure's. When a rank fails, the others are
    stopped (SIGTERM, then SIGKILL) instead of waiting in a collective for it forever."""

    GRACE_S = 30.0

    def __init__(self, main: Callable[[list[str]], int], argv: list[str], processes: int, env: dict[str, str]):
        import torch.distributed  # deferred: the demo has imported it already; this module's other users need not

        # The rendezvous store is hosted here, as torchrun's agent hosts it, and binds port 0 itself:
        # a port found free and bound later by rank 0 can be taken in between (gloo's connections of
        # another run on the machine take ephemeral ports). TORCHELASTIC_USE_AGENT_STORE makes every
        # rank a client of it.
        self.store = torch.distributed.TCPStore("127.0.0.1", 0, processes, is_master=True, wait_for_workers=False)
        port = self.store.port
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        # multiprocessing's fork, not a bare os.fork: its child runs multiprocessing's own exit
        # (finalizers: a Manager or worker the tool starts is shut down, not left holding the pipe)
        ctx = multiprocessing.get_context("fork")
        self.procs = []
        for rank in range(processes):
            world = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
                     "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                     "TORCHELASTIC_USE_AGENT_STORE": "True"}
            proc = ctx.Process(target=_rank, args=(main, argv, {**env, **world}, read, write), name=f"rank {rank}")
            proc.start()
            self.procs.append(proc)
        self.pids = [p.pid for p in self.procs]
        os.close(write)  # the ranks hold the pipe open; it ends when the last of them does
        self.out = os.fdopen(read, encoding="utf-8", errors="replace")
        self.codes: dict[int, int] = {}
        self.failures: list[int] = []  # non-zero exit statuses in the order they came: the cause first
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def lines(self) -> Iterator[str]:
        yield from self.out

    def stop(self) -> None:
        """SIGTERM every rank still running (the caller was stopped: the ranks are its to end)."""
        for pid in self.pids:
            if pid not in self.codes:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        self.watcher.join()
        self.out.close()
        self.store = None  # the ranks are gone: the rendezvous port is given back
        return self.failures[0] if self.failures else 0

    def _watch(self) -> None:
        failed_at: Optional[float] = None
        while len(self.codes) < len(self.pids):
            for proc in self.procs:
                pid = proc.pid
                if pid in self.codes:
                    continue
                if proc.exitcode is not None:
                    self.codes[pid] = proc.exitcode
                    if self.codes[pid] != 0:
                        self.failures.append(self.codes[pid])
                        failed_at = failed_at or time.time()
            if failed_at is not None:  # a rank failed: the rest cannot finish a step without it
                late = time.time() - failed_at
                for pid in self.pids:
                    if pid not in self.codes and late > self.GRACE_S:
                        os.kill(pid, signal.SIGKILL if late > 2 * self.GRACE_S else signal.SIGTERM)
            time.sleep(0.2)


def _rank(main: Callable[[list[str]], int], argv: list[str], env: dict[str, str], in_fd: int, out_fd: int) -> None:
    """A forked rank: a process of its own as far as the tool can tell (the parent's atexit
    handlers are not its own; multiprocessing ends it with its exit status)."""
    code = 1
    try:
        os.close(in_fd)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        os.environ.update(env)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        atexit._clear()  # the parent's exit handlers are not this process's
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001  (a rank's traceback is its last word)
        traceback.print_exc()
    try:
        atexit._run_exitfuncs()  # the tool's own; multiprocessing then joins its threads and exits
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


class Forked:
    """``fn()`` in a forked child while the caller goes on; ``result()`` waits and returns what
    ``fn`` returned (a picklable value) or raises ``error(label, message)``. Where fork is not
    available, ``fn`` runs at once, in this process."""

    def __init__(self, fn: Callable[[], object], label: Optional[str], error: Callable[[str, str], Exception]):
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

    @classmethod
    def each(cls, jobs: list[tuple[str, Callable[[], object]]], error: Callable[[str, str], Exception]) -> "Forked":
        """One child that runs ``jobs`` (label, fn) one after another, each line of its output
        under its own label; ``result()`` is the list of their results."""
        def run_all() -> list:
            results = []
            for label, fn in jobs:
                if isinstance(sys.stdout, _Prefixed):
                    sys.stdout.label = label
                results.append(fn())
            return results
        return cls(run_all, jobs[0][0], error)

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


def _child(fn: Callable[[], object], conn, label: Optional[str]) -> None:
    # the parent's Rust thread pool (tokenizer training) is not in the child: tokenizers must not
    # wait for it (they would only warn and go serial, as this says without the warning)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if label:
        sys.stdout = _Prefixed(sys.stdout, label)
    try:
        value = fn()
        status = "ok"
    except BaseException as e:  # noqa: BLE001  (the parent reports it, naming the work)
        # the project's errors say what went wrong in their message; anything else needs its traceback
        status, value = "error", str(e) if isinstance(e, AprielError) else traceback.format_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    conn.send((status, value))
    conn.close()  # multiprocessing ends the child: its finalizers, not the parent's atexit handlers
