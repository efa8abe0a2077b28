"""Run untrusted Python (model-written code) in a contained child process.

Written by hand because neither TRL nor transformers ships an execution sandbox, and the code
reward must run thousands of model completions on the training nodes themselves. Containment is
layered so that one failing layer does not let a program out:

- kernel limits (``setrlimit`` in the child before ``exec``): CPU seconds (RLIMIT_CPU), address
  space (RLIMIT_AS), processes (RLIMIT_NPROC), size of any file written, stdout included
  (RLIMIT_FSIZE), and no core files;
- when running as root with util-linux ``unshare``/``setpriv`` (the usual container case): a fresh
  network namespace (only a downed loopback, so every connection fails), a fresh PID namespace
  (when its first process dies the kernel kills everything else in it, so nothing outlives the
  run, even a process that escaped its process group with ``setsid``), and the program runs as the
  unprivileged ``nobody`` user, because root ignores RLIMIT_NPROC and could write anywhere;
- otherwise (not root): the child gets its own session and the whole process group is killed;
  the network is then blocked only by the audit hook below;
- in every mode an audit hook (PEP 578) installed before the program runs refuses socket creation
  and any write, rename, removal or directory creation outside the scratch directory, and signals
  to other processes. It is a second line for world-writable places (``/tmp``) that ``nobody`` can
  still write to, and the only guard of the grader's own process in the non-root mode;
- a wall-clock timeout, a fresh scratch directory as cwd (deleted afterwards), stdout/stderr
  written to files the parent reads back truncated to ``max_output_bytes``.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

NOBODY_UID = 65534
NOBODY_GID = 65534

# Runs in the child before the program: install the audit hook, then execute the program file as
# __main__. Kept free of imports beyond sys/os so it starts fast and exposes nothing to the program.
_BOOTSTRAP = r"""
import os, sys
_root = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _inside(p):
    try:
        p = os.fsdecode(p) if not isinstance(p, int) else None
    except Exception:
        return False
    if p is None:
        return True
    p = os.path.realpath(os.path.join(_root, p))
    return p == _root or p.startswith(_root + os.sep)
def _hook(event, args):
    if event.startswith("socket.") or event in ("_socket.__new__",):
        raise PermissionError("network access is disabled in the sandbox")
    if event in ("os.kill", "os.killpg") and args[0] not in (0, os.getpid(), os.getpgid(0)):
        raise PermissionError("signalling other processes is disabled in the sandbox")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE)
        if writing and not _inside(path):
            raise PermissionError(f"writing outside the scratch directory is disabled: {path}")
    elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                   "os.chmod", "os.chown", "os.truncate", "shutil.rmtree", "shutil.move",
                   "shutil.copyfile", "os.utime"):
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if event in ("shutil.copyfile", "os.symlink", "os.link") and paths:
            paths = paths[1:]
        if event == "os.rename" and paths:
            paths = paths[:2]
        for p in paths:
            if not _inside(p):
                raise PermissionError(f"{event} outside the scratch directory is disabled: {p}")
sys.addaudithook(_hook)
_prog = sys.argv[1]
sys.argv = sys.argv[1:]
with open(_prog) as _f:
    _code = compile(_f.read(), "program.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
"""


@dataclasses.dataclass
class SandboxLimits:
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30
    max_processes: int = 16
    max_file_bytes: int = 1 << 20
    max_output_bytes: int = 64 << 10
    # Interpreter for the program; "" picks one the unprivileged user can execute.
    python: str = ""


@dataclasses.dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float
    isolated: bool  # True when the namespace + unprivileged-user layer was active

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _world_executable(path: str) -> bool:
    """True when a non-root user can reach and run ``path`` (every parent dir o+x, file o+x)."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _can_isolate() -> bool:
    return (os.geteuid() == 0 and sys.platform.startswith("linux")
            and shutil.which("unshare") is not None and shutil.which("setpriv") is not None)


_ISOLATION_CHECKED: bool | None = None


def isolation_available() -> bool:
    """Namespaces can be refused inside some containers even for root: try once and remember."""
    global _ISOLATION_CHECKED
    if _ISOLATION_CHECKED is None:
        _ISOLATION_CHECKED = False
        if _can_isolate():
            try:
                r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--kill-child", "setpriv",
                                    f"--reuid={NOBODY_UID}", f"--regid={NOBODY_GID}", "--clear-groups", "true"],
                                   capture_output=True, timeout=10)
                _ISOLATION_CHECKED = r.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                pass
    return _ISOLATION_CHECKED


def choose_python(isolated: bool) -> str:
    if not isolated or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if candidate and _world_executable(candidate):
            return candidate
    raise RuntimeError("no Python interpreter is executable by the unprivileged sandbox user; "
                       "set limits.python to one (every parent directory needs o+x)")


def _read_capped(path: str, cap: int) -> str:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    text = data[:cap].decode("utf-8", errors="replace")
    return text + ("\n...[output truncated]" if len(data) > cap else "")


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a Python program with ``stdin``; returns its (truncated) output."""
    limits = limits or SandboxLimits()
    isolated = isolation_available()
    python = limits.python or choose_python(isolated)
    work = tempfile.mkdtemp(prefix="apriel-sandbox-")
    try:
        scratch = os.path.join(work, "scratch")
        os.mkdir(scratch)
        # The parent keeps the io files outside the scratch dir so the program cannot replace them.
        paths = {n: os.path.join(work, n) for n in ("program.py", "bootstrap.py", "stdin", "stdout", "stderr")}
        for name, text in (("program.py", code), ("bootstrap.py", _BOOTSTRAP), ("stdin", stdin)):
            with open(paths[name], "w") as f:
                f.write(text)
        if isolated:
            os.chmod(work, 0o711)  # nobody may traverse, not list or write
            os.chown(scratch, NOBODY_UID, NOBODY_GID)
            for name in ("program.py", "bootstrap.py", "stdin"):
                os.chmod(paths[name], 0o644)

        nproc = limits.max_processes
        if not isolated:
            import psutil

            uid = os.getuid()
            nproc += sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid)

        def preexec():
            os.setsid()
            for lim, value in ((resource.RLIMIT_CPU, limits.cpu_seconds),
                               (resource.RLIMIT_AS, limits.memory_bytes),
                               (resource.RLIMIT_FSIZE, limits.max_file_bytes),
                               (resource.RLIMIT_CORE, 0)):
                resource.setrlimit(lim, (value, value))
            # Counts every process of the user: nobody's when isolated; in the non-root fallback the
            # user's existing processes plus the allowance (root ignores it).
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

        cmd = [python, "-I", "-S", "-B", paths["bootstrap.py"], paths["program.py"]]
        if isolated:
            cmd = ["unshare", "--net", "--pid", "--fork", "--kill-child", "setpriv",
                   f"--reuid={NOBODY_UID}", f"--regid={NOBODY_GID}", "--clear-groups", *cmd]
        start = time.monotonic()
        with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                open(paths["stderr"], "wb") as ferr:
            proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=scratch,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch},
                                    preexec_fn=preexec, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Everything the program started is in this process group (and, when isolated, in
                # the PID namespace that dies with its first process).
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        elapsed = time.monotonic() - start
        rc = proc.returncode
        return SandboxResult(returncode=None if timed_out else rc,
                             stdout=_read_capped(paths["stdout"], limits.max_output_bytes),
                             stderr=_read_capped(paths["stderr"], limits.max_output_bytes),
                             timed_out=timed_out, wall_seconds=elapsed, isolated=isolated)
    finally:
        shutil.rmtree(work, ignore_errors=True)
