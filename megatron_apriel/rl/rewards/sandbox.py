"""Run untrusted Python (model-written code) in a contained child process, and a pool that runs many.

GRPO optimises the policy against this grader, so anything a program can do to raise its score or
reach outside will eventually be found. Containment therefore lives in the kernel, set up by
bubblewrap (``bwrap``, the sandbox Flatpak uses; Debian package ``bubblewrap``), not in Python:
neither TRL nor transformers ships an execution sandbox, and bwrap needs no root where unprivileged
user namespaces are enabled (most clusters).

``isolation: bwrap`` (the default; one mode for root and ordinary users):

- new user, PID, network, IPC, UTS and cgroup namespaces, no nested user namespaces: the program
  sees only its own processes (it is PID 2; PID 1 is bwrap's init, and when it dies the kernel kills
  everything left in the namespace), has only a loopback network of its own, and no capabilities;
- a new mount namespace holding only ``/usr`` and the interpreter's prefix, read-only (its
  site-packages hidden), its own ``/proc`` and minimal ``/dev``, a private size-capped tmpfs for
  ``/tmp``, ``/dev/shm`` and the scratch directory ``/scratch`` (its cwd and $HOME), everything else
  read-only, and ``/sandbox`` with the
  harness's code, read-only. The grader's files, other runs' scratch, /root and homes do not exist
  there. The program (in the test process: the test code) arrives through an unlinked file closed before
  the program runs, and stdin/stdout/stderr are unlinked files too. A clean environment, a new
  session (no terminal injection), ``--die-with-parent``;
- when the grader is root, bwrap itself runs as ``nobody`` (65534): a root-owned namespace would
  let the program's processes count as root's, which the kernel exempts from RLIMIT_NPROC;
- rlimits set by the harness before the program starts: CPU seconds, address space, processes
  (counted per user namespace, so per run), file size (stdout included), no core files;
- a wall-clock timeout after which the whole session is killed.

``isolation: rlimits-only`` is a weaker mode for machines where bwrap cannot create namespaces.
It must be chosen by name and warns once: the rlimits, a PEP 578 audit hook (sockets, writes outside
the scratch dir, signals) and a process-group kill are all there is; a child process or ctypes goes
around the hook, so the network, the filesystem (the shared harness file included, so the verdicts
of later runs too), the test process of an assert run (same user, no namespaces) and the grader's
processes are not protected.

The verdict of an assert test cannot come from the program's exit status, which the program
controls (``sys.exit(0)``, ``os._exit(0)``, an atexit handler...), nor from asserts that run in the
program's interpreter (an object whose ``__eq__`` always returns True passes ``assert f(x) == y``; a
program that knows the harness can forge whatever the harness would report). ``run_asserts`` therefore
uses two sandboxes per completion, joined only by two pipes: the program's process answers calls with
values encoded by a strict codec, and a test process, which the program's process can neither see nor
reach (other namespaces, no descriptor in common), runs the test code and writes the verdicts to a file
only it and the grader hold. sandbox_harness.py describes the protocol and what crosses.

A program run alone (stdin/stdout tests) reports ``completed`` when it returned: the grader hands the
harness a random token in a pipe, which the harness splices into a second pipe after the program
(the token never enters the process's memory), so an early exit by any route leaves it unset.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import logging
import os
import py_compile
import secrets
import select
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import psutil

from megatron_apriel.config import ConfigError
from megatron_apriel.errors import RunError

log = logging.getLogger(__name__)

NOBODY_UID = 65534
NOBODY_GID = 65534
ISOLATION_MODES = ("bwrap", "rlimits-only")
TOKEN_BYTES = 32

# The harness (sandbox_harness.py) is copied into a directory bound read-only as /sandbox. It imports
# nothing of this package (it runs alone in the sandbox); the grader loads it only for its codec, which
# carries the test code to the test process.
_HARNESS_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_harness.py")


class SandboxUnavailable(RunError):
    """The configured isolation cannot run on this machine."""


@dataclasses.dataclass
class SandboxLimits:
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30
    max_processes: int = 16
    max_file_bytes: int = 1 << 20
    max_output_bytes: int = 64 << 10
    # Size of each of the private tmpfs mounts (/scratch, /tmp, /dev/shm) in the bwrap mode.
    scratch_bytes: int = 16 << 20
    # Concurrent sandboxes of the pool (0: one per CPU core).
    workers: int = 0
    # "bwrap" (namespaces, the default) or "rlimits-only" (weaker; see the module docstring).
    isolation: str = "bwrap"
    # Interpreter for the program; "" picks this one, or one that `nobody` can run when root.
    python: str = ""

    def validate(self):
        if self.isolation not in ISOLATION_MODES:
            raise ConfigError(f"rewards.sandbox.isolation: unknown mode {self.isolation!r} "
                              f"(known: {', '.join(ISOLATION_MODES)})")
        for key in ("cpu_seconds", "wall_seconds", "memory_bytes", "max_processes", "max_file_bytes", "scratch_bytes"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"rewards.sandbox.{key}: must be > 0, got {getattr(self, key)}")
        if self.workers < 0:
            raise ConfigError(f"rewards.sandbox.workers: must be >= 0 (0: one per core), got {self.workers}")


@dataclasses.dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float
    isolation: str  # "bwrap" or "rlimits-only": which containment was active for this run
    # run mode: the harness saw the program return; assert runs: every test passed
    completed: bool = False
    # assert runs: (passed, why not) per test, in order
    outcomes: list[tuple[bool, str]] | None = None

    @property
    def isolated(self) -> bool:
        return self.isolation == "bwrap"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def signal(self) -> int | None:
        """The signal that ended the program, if one did. bwrap reports its child's death by signal
        N as exit status 128 + N, as a shell does; without it the status is -N."""
        rc = self.returncode
        if rc is not None and rc < 0:
            return -rc
        if rc is not None and self.isolated and 128 < rc < 128 + 65:
            return rc - 128
        return None

    @property
    def cpu_limited(self) -> bool:
        """Ended by RLIMIT_CPU: SIGXCPU at the soft limit the harness sets one second below the hard one."""
        return self.signal == 24


def _world_executable(path: str) -> bool:
    """True when any user can reach and run ``path`` (every parent dir o+x, the file o+x)."""
    path = os.path.realpath(path)
    try:
        while True:
            if not os.stat(path).st_mode & 0o001:
                return False
            if path == os.path.dirname(path):
                return True
            path = os.path.dirname(path)
    except OSError:
        return False


def choose_python(limits: SandboxLimits) -> str:
    """The interpreter of the program: limits.python, this one, or (root) one that nobody can run."""
    if limits.python:
        if os.geteuid() == 0 and limits.isolation == "bwrap" and not _world_executable(limits.python):
            raise SandboxUnavailable(f"rewards.sandbox.python: {limits.python} is not executable by nobody, "
                                     "whom the sandbox runs as under root (every parent directory needs o+x)")
        return limits.python
    if os.geteuid() != 0 or limits.isolation != "bwrap" or _world_executable(sys.executable):
        return os.path.realpath(sys.executable)
    for candidate in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", "/usr/bin/python3",
                      "/usr/local/bin/python3", shutil.which("python3") or ""):
        if candidate and _world_executable(candidate):
            return os.path.realpath(candidate)
    raise SandboxUnavailable("no Python interpreter is executable by the sandbox user nobody; set "
                             "rewards.sandbox.python to one (every parent directory needs o+x)")


def _bwrap_base(python: str, limits: SandboxLimits, sandbox_dir: str) -> list[str]:
    """bwrap arguments up to (not including) the command, ``sandbox_dir`` bound read-only as
    /sandbox: see the module docstring."""
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
           "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/scratch",
           "--setenv", "LANG", "C.UTF-8", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    if os.path.exists("/etc/ld.so.cache"):
        cmd += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # The interpreter's prefix (pyenv, conda, a module tree) when it lives outside /usr, without
    # its site-packages: programs get the standard library only.
    prefix = os.path.dirname(os.path.dirname(python))
    if prefix not in ("/usr", "/") and not prefix.startswith("/usr/"):
        cmd += ["--ro-bind", prefix, prefix]
    paths = sysconfig.get_paths() if prefix == os.path.realpath(sys.base_prefix) else {}
    site = paths.get("purelib", "")
    if site.startswith(prefix + "/") and os.path.isdir(site):
        cmd += ["--tmpfs", site]
    # Every writable place is a size-capped tmpfs (RLIMIT_FSIZE caps one file, not how many); the
    # root and /dev that bwrap builds are tmpfs without a cap, so they are made read-only.
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.scratch_bytes), "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev"]
    for place in ("/tmp", "/scratch"):
        cmd += ["--size", str(limits.scratch_bytes), "--tmpfs", place]
    return cmd + ["--ro-bind", sandbox_dir, "/sandbox", "--remount-ro", "/", "--chdir", "/scratch"]


def _as_nobody() -> dict:
    """Popen arguments that drop root to nobody for bwrap (without a preexec_fn: the pool is threaded)."""
    return {"user": NOBODY_UID, "group": NOBODY_GID, "extra_groups": []} if os.geteuid() == 0 else {}


_CHECKED: dict[tuple, str] = {}
_WARNED = False
_LOCK = threading.RLock()  # re-entered: the isolation check makes the harness directory


def isolation_mode(limits: SandboxLimits | None = None) -> str:
    """The isolation that runs will use, checked once per interpreter and process user.

    Raises SandboxUnavailable when bwrap is configured but cannot run here (not installed, user
    namespaces disabled); the weaker mode must then be chosen by name."""
    global _WARNED
    limits = limits or SandboxLimits()
    limits.validate()
    if limits.isolation == "rlimits-only":
        with _LOCK:
            if not _WARNED:
                _WARNED = True
                log.warning("\n%s\nCODE SANDBOX IN rlimits-only MODE: programs are limited in CPU, memory, processes "
                            "and file size, and a Python audit hook refuses sockets, writes outside the scratch dir "
                            "and signals; a child process or ctypes goes around that hook, so the NETWORK, the "
                            "FILESYSTEM, the GRADER'S PROCESSES and the VERDICTS OF ASSERT TESTS ARE NOT PROTECTED, "
                            "and a process that leaves its session may outlive the run. Use isolation: bwrap "
                            "wherever it can run.\n%s",
                            "!" * 100, "!" * 100)
        return "rlimits-only"
    python = choose_python(limits)
    key = (python, os.geteuid())
    with _LOCK:
        if key not in _CHECKED:
            why = "bwrap is not installed (Debian/Ubuntu package bubblewrap)" if shutil.which("bwrap") is None else ""
            if not why:
                try:
                    r = subprocess.run(_bwrap_base(python, limits, _harness_dir()) + [python, "-I", "-S", "-c", "pass"],
                                       capture_output=True, text=True, timeout=30, **_as_nobody())
                    why = "" if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")
                except (OSError, subprocess.TimeoutExpired) as e:
                    why = str(e)
            _CHECKED[key] = why
        why = _CHECKED[key]
    if why and "Unknown option" in why:
        raise SandboxUnavailable(f"the code sandbox needs bubblewrap 0.8 or newer ({why.splitlines()[-1]}); "
                                 "install a newer bwrap, or set rewards.sandbox.isolation=rlimits-only to accept "
                                 "the weaker mode")
    if why:
        raise SandboxUnavailable(f"the code sandbox cannot start bwrap here ({why.splitlines()[-1]}); user "
                                 "namespaces may be disabled (sysctl kernel.unprivileged_userns_clone / "
                                 "user.max_user_namespaces). Set rewards.sandbox.isolation=rlimits-only to "
                                 "accept the weaker mode")
    return "bwrap"


def _read_capped(f, cap: int) -> str:
    f.seek(0)
    data = f.read(cap + 1)
    text = data[:cap].decode("utf-8", errors="replace")
    return text + ("\n...[output truncated]" if len(data) > cap else "")


def _read_verdict(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 2 * TOKEN_BYTES)
    except BlockingIOError:
        return b""


_HARNESS_DIR: str | None = None


def _harness_dir() -> str:
    """A directory holding harness.py, made once per process and bound read-only as /sandbox.

    Readable by anyone (bwrap may run as nobody); it holds nothing but the harness's own code."""
    global _HARNESS_DIR
    with _LOCK:
        if _HARNESS_DIR is None or not os.path.exists(os.path.join(_HARNESS_DIR, "harness.py")):
            folder = tempfile.mkdtemp(prefix="apriel-sandbox-harness-")
            shutil.copyfile(_HARNESS_SOURCE, os.path.join(folder, "harness.py"))
            # Compiled once here (every sandbox then loads the bytecode, not ~800 lines of source);
            # an interpreter of another version compiles it itself.
            cached = py_compile.compile(os.path.join(folder, "harness.py"), doraise=True)
            for path, mode in ((folder, 0o755), (os.path.dirname(cached), 0o755), (cached, 0o644),
                               (os.path.join(folder, "harness.py"), 0o644)):
                os.chmod(path, mode)
            atexit.register(shutil.rmtree, folder, True)
            _HARNESS_DIR = folder
        return _HARNESS_DIR


def _unlinked(data: bytes, stack: contextlib.ExitStack):
    """A file with ``data`` that has no name: a child reaches it only through the descriptor."""
    f = stack.enter_context(tempfile.TemporaryFile())
    f.write(data)
    f.flush()
    f.seek(0)
    return f


class _Sandbox:
    """One sandboxed harness process: its command, descriptors and captured output (unlinked files)."""

    def __init__(self, mode: str, source: bytes, stdin: str, limits: SandboxLimits, isolation: str,
                 stack: contextlib.ExitStack, fds: tuple, cpu_seconds: int, user_nproc: int = 0):
        python = choose_python(limits)
        src = _unlinked(source, stack)
        fin = _unlinked(stdin.encode(), stack)
        self.stdout = stack.enter_context(tempfile.TemporaryFile())
        self.stderr = stack.enter_context(tempfile.TemporaryFile())
        if isolation == "bwrap":
            where, nproc, weak = "/sandbox", limits.max_processes, "0"
            cmd = _bwrap_base(python, limits, _harness_dir())
            cwd, extra = "/", _as_nobody()
        else:
            where, weak = _harness_dir(), "1"
            nproc = user_nproc or _user_nproc(limits)
            cwd = tempfile.mkdtemp(prefix="apriel-sandbox-")
            stack.callback(_remove_tree, cwd)
            cmd, extra = [], {}
        boot = f"import sys; sys.path.insert(0, {where!r}); import harness; harness.main(sys.argv)"
        cmd += [python, "-I", "-S", "-B", "-c", boot, mode, str(cpu_seconds), str(limits.memory_bytes),
                str(nproc), str(limits.max_file_bytes), weak, str(src.fileno()), *map(str, fds)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": cwd}
        passed = (src.fileno(), *(fd for fd in fds if isinstance(fd, int)))
        self.proc = subprocess.Popen(cmd, stdin=fin, stdout=self.stdout, stderr=self.stderr, cwd=cwd, env=env,
                                     close_fds=True, pass_fds=passed, start_new_session=True, **extra)

    def kill(self):
        """bwrap's session (its init takes the whole PID namespace down with it), or in the
        rlimits-only mode the program's session. Once only: the id could be reused after the wait."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()


def _user_nproc(limits: SandboxLimits) -> int:
    """RLIMIT_NPROC for the rlimits-only mode: it counts every thread of every process of the user
    (root is exempt), so allow the user's current ones, the grader's pool threads included."""
    uid = os.getuid()
    return limits.max_processes + sum(p.info["num_threads"] or 1 for p in psutil.process_iter(["uids", "num_threads"])
                                      if p.info["uids"] and p.info["uids"].real == uid)


def _closing(fds: set[int], stack: contextlib.ExitStack):
    # Each descriptor is closed exactly once: a second close could hit another thread's new one.
    stack.callback(lambda: [os.close(fd) for fd in fds])

    def close(*some):
        for fd in some:
            fds.discard(fd)
            os.close(fd)
    return close


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None,
               check: str | list[str] | None = None) -> SandboxResult:
    """Run ``code`` as a Python program with ``stdin``; returns its (truncated) output.

    With ``check`` (the test code of one assert test, or a list of them) the program runs in a
    process of its own and each test's code in a second sandbox that reaches the program only
    through calls answered with values (``run_asserts``); ``completed`` says whether every test
    passed and ``outcomes`` why each failed. Program, test code, stdin, stdout and stderr are
    unlinked files: nothing of a run has a name the program could open."""
    limits = limits or SandboxLimits()
    if check is not None:
        return run_asserts(code, [check] if isinstance(check, str) else list(check), limits, stdin)
    mode = isolation_mode(limits)
    with contextlib.ExitStack() as stack:
        token = secrets.token_bytes(TOKEN_BYTES)
        tok_r, tok_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        close = _closing({tok_r, tok_w, verdict_r, verdict_w}, stack)
        os.write(tok_w, token)
        start = time.monotonic()
        box = _Sandbox("run", code.encode(), stdin, limits, mode, stack, (tok_r, verdict_w), limits.cpu_seconds)
        close(tok_w, verdict_w)  # the verdict pipe must have no writer left but the sandbox's
        try:
            timed_out = not _wait_exit(box.proc, limits.wall_seconds)
        finally:
            box.kill()
        completed = _read_verdict(verdict_r) == token
        return SandboxResult(returncode=None if timed_out else box.proc.returncode,
                             stdout=_read_capped(box.stdout, limits.max_output_bytes),
                             stderr=_read_capped(box.stderr, limits.max_output_bytes),
                             timed_out=timed_out, wall_seconds=time.monotonic() - start, isolation=mode,
                             completed=completed)


def _codec():
    """The harness module, loaded from its file (the grader encodes the test code with its codec)."""
    global _CODEC
    if _CODEC is None:
        spec = importlib.util.spec_from_file_location("_apriel_sandbox_harness", _HARNESS_SOURCE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CODEC = module
    return _CODEC


_CODEC = None


def run_asserts(code: str, checks: list[str], limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Grade ``code`` against assert tests (``checks``: each test's code) in two sandboxes.

    The program's process runs the program and, for each test, a child forked from it answers calls
    (a function name and arguments) with values; the test process runs each test's code with
    stand-ins that forward those calls, and writes one verdict line per test to a file that only it
    and the grader hold. The two are joined by two pipes and nothing else (separate namespaces under
    bwrap): the program decides no verdict and never sees the test code. See sandbox_harness.py."""
    limits = limits or SandboxLimits()
    mode = isolation_mode(limits)
    n = len(checks)
    with contextlib.ExitStack() as stack:
        call_r, call_w = os.pipe()
        answer_r, answer_w = os.pipe()
        close = _closing({call_r, call_w, answer_r, answer_w}, stack)
        verdicts = stack.enter_context(tempfile.TemporaryFile())
        start = time.monotonic()
        wall = f"{float(limits.wall_seconds)!r}"
        nproc = _user_nproc(limits) if mode == "rlimits-only" else 0  # once for both (a scan of all processes)
        program = _Sandbox("program", code.encode(), stdin, limits, mode, stack, (call_r, answer_w, wall),
                           limits.cpu_seconds, nproc)
        stack.callback(program.kill)
        close(call_r, answer_w)
        tests = _Sandbox("test", _codec().encode(tuple(checks)), "", limits, mode, stack,
                         (call_w, answer_r, verdicts.fileno(), wall), limits.cpu_seconds * max(1, n), nproc)
        close(call_w, answer_r)
        try:
            # Each test has wall_seconds (the program's process stops a child past it) and the test
            # process waits 2 s more before it gives up on an answer; this is the backstop.
            timed_out = not _wait_exit(tests.proc, (n + 1) * (limits.wall_seconds + 3))
        finally:
            tests.kill()
            program.kill()
        verdicts.seek(0)
        lines = verdicts.read().decode("utf-8", "replace").splitlines()[:n]
        outcomes = [(line == "P", "" if line == "P" else line[2:]) for line in lines]
        if len(outcomes) < n:
            err = _read_capped(tests.stderr, 2000).strip().splitlines()
            why = (f"timed out after {(n + 1) * (limits.wall_seconds + 3):g}s" if timed_out else
                   "the test process ended without a verdict" + (f" ({err[-1][:200]})" if err else ""))
            outcomes += [(False, why)] * (n - len(outcomes))
        program_timed_out = any(why.startswith("timed out after") for ok, why in outcomes if not ok)
        return SandboxResult(returncode=program.proc.returncode, stdout=_read_capped(program.stdout,
                             limits.max_output_bytes), stderr=_read_capped(program.stderr, limits.max_output_bytes),
                             timed_out=timed_out or program_timed_out, wall_seconds=time.monotonic() - start,
                             isolation=mode, completed=all(ok for ok, _ in outcomes), outcomes=outcomes)


def _wait_exit(proc: subprocess.Popen, seconds: float) -> bool:
    """Wait for ``proc`` up to ``seconds``; False on timeout. A pidfd wakes up the moment the process
    exits (Popen.wait(timeout) polls with sleeps of up to 50 ms, as long as a trivial run)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, seconds) * 1000))
    finally:
        os.close(fd)


def _remove_tree(path: str):
    """rmtree that also removes what a program made unreadable (chmod 0 on a dir in its scratch)."""
    def retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, onerror=retry)
            else:
                func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=retry)


_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def pool_size(limits: SandboxLimits) -> int:
    return limits.workers if limits.workers > 0 else (os.cpu_count() or 1)


def run_many(jobs: list[tuple[str, str, str | list[str] | None]],
             limits: SandboxLimits | None = None) -> list[SandboxResult]:
    """Run ``(code, stdin, check)`` jobs (see ``run_python``) concurrently on a pool of
    ``limits.workers`` sandboxes (an assert job is one pair of them).

    The pool is threads, each waiting on one sandbox process: the work happens in the children."""
    limits = limits or SandboxLimits()
    isolation_mode(limits)  # refuse (or warn) once, before anything runs
    n = pool_size(limits)
    with _LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            pool = _POOLS[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="sandbox")
    return list(pool.map(lambda job: run_python(job[0], job[1], limits, job[2]), jobs))
