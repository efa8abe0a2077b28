"""Run several ``apriel`` verbs in one process and report each one's exit code and stderr (JSON).

Used by tests/test_edges.py for what needs a process of its own: real signals and file systems that
are full or read-only (under bubblewrap). Paying the imports once for many verbs keeps those tests
fast. ``python tests/edge_driver.py JOBS.json RESULTS.json``; a job is one of

- ``{"argv": [verb, ...]}``, with optional ``"signal": "SIGINT" | "SIGTERM"`` and ``"marker"`` (a
  string, or a list of strings that must all occur): the process sends that signal, a real one, to
  its whole process group (as Ctrl-C and schedulers do; start the driver in a session of its own)
  at the moment the verb first opens for writing a path holding the marker (a Python audit hook),
  i.e. while its output is half-written; ``"exit": true`` ends the process with the verb's exit
  code (``sys.exit(main())``, as the ``apriel`` command does), so the caller sees that code too;
- ``{"fill": FILE}``: fill FILE's file system to the last byte;
- ``{"list": DIR}``: report the files under DIR (inside mounts that end with the process).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys

_ARMED: dict = {}
_ARMED_FILE = ""


def _writes(args) -> bool:
    path, mode, flags = (list(args) + [None, None, None])[:3]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _nothing() -> None:
    """A Python call: the interpreter runs the pending signal's handler at its start."""


def _hook(event: str, args) -> None:
    if not _ARMED or event != "open" or not _writes(args):
        return
    markers = _ARMED["marker"] if isinstance(_ARMED["marker"], list) else [_ARMED["marker"]]
    if not all(m in os.fsdecode(args[0]) for m in markers):
        return
    sig = _ARMED.pop("signal")
    _ARMED.clear()
    open(_ARMED_FILE, "w").close()  # a worker process may be the one that writes: tell the driver
    os.killpg(os.getpgid(0), sig)  # as Ctrl-C and a scheduler do: the whole process group
    _nothing()


def _save(results: list) -> None:
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


def main() -> None:
    global _ARMED_FILE
    jobs = json.loads(open(sys.argv[1]).read())
    _ARMED_FILE = sys.argv[2] + ".fired"
    # a shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: restore
    # what an interactive user's process has, whatever ran the tests
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.addaudithook(_hook)
    from megatron_apriel.cli import main as apriel

    results = []
    for job in jobs:
        if job.get("list"):  # what is left in a folder (e.g. a tmpfs that is gone once the process ends)
            root = job["list"]
            results.append({"rc": 0, "stderr": "", "fired": False, "listing": sorted(
                os.path.relpath(os.path.join(d, n), root) for d, _, files in os.walk(root) for n in files)})
            _save(results)
            continue
        if job.get("fill"):  # fill a file system to the last byte (a disk that is already full)
            try:
                with open(job["fill"], "wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
            except OSError:  # full: from a write, or from the flush on closing
                pass
            results.append({"rc": 0, "stderr": "", "fired": False})
            _save(results)
            continue
        if job.get("signal"):
            _ARMED.update(signal=getattr(signal, job["signal"]), marker=job.get("marker", ".tmp"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = apriel(job["argv"])
            except SystemExit as e:  # argparse
                rc = e.code
        fired = os.path.exists(_ARMED_FILE)
        if fired:
            os.remove(_ARMED_FILE)
        _ARMED.clear()
        results.append({"rc": rc, "stderr": err.getvalue(), "fired": fired})
        _save(results)
        if job.get("exit"):
            sys.stderr.write(err.getvalue())
            sys.exit(rc)


if __name__ == "__main__":
    main()
