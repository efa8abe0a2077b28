"""The code sandbox contains hostile programs: each is contained, scores zero where it cheats, leaves
nothing behind and the grader alive. The same module runs again as an ordinary user (how training
runs on clusters) through test_hostile_programs_as_an_ordinary_user."""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import skip_unless_system

from megatron_apriel.config import ConfigError
from megatron_apriel.rl.rewards import (
    RewardsConfig,
    SandboxLimits,
    SandboxUnavailable,
    code_reward,
    run_many,
    run_python,
    sandbox,
)

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5, memory_bytes=512 << 20, max_processes=8,
                       max_file_bytes=256 << 10, max_output_bytes=4096, workers=2)
# For programs that run until a limit stops them.
QUICK = dataclasses.replace(LIMITS, cpu_seconds=1, wall_seconds=2)
ADD_TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6\n"}]
ASSERT_TESTS = [{"assert": "assert add(2, 3) == 5"}, {"assert": "assert add(10, -4) == 6"}]
HONEST = "a, b = map(int, input().split())\nprint(a + b)"
USER = "apriel-ci"
# Every test here runs programs under bubblewrap unless marked bwrap(False) (conftest: skipped with the
# install line where bwrap is missing).
pytestmark = pytest.mark.bwrap


def answer(program: str) -> str:
    return f"I will read two ints.\n[BEGIN FINAL RESPONSE]\n```python\n{program}\n```\n[END FINAL RESPONSE]"


def grade(program: str, tests=ADD_TESTS, limits=LIMITS):
    return code_reward(answer(program), tests=tests, limits=limits)


def left_behind(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_nothing_left(marker: str | None = None):
    # Every sandbox of this process names its harness directory (unique to the process) in its
    # command line; other processes' sandboxes on a shared machine do not.
    marker = marker or sandbox._harness_dir()
    # the kernel tears a fork bomb's PID namespace down process by process: on a loaded machine
    # (seen at load ~4 with the suite at nice 19) bwrap itself can take more than 3 s to go
    deadline = time.time() + 15
    while left_behind(marker) and time.time() < deadline:
        time.sleep(0.1)
    assert left_behind(marker) == []


def towards_interpreter(folder: str) -> list[str]:
    """The one entry of ``folder`` that the sandbox shows on the way to the interpreter's prefix
    (a pyenv under /root is bound at its own path), or none."""
    python = sandbox.choose_python(LIMITS)
    prefix = os.path.dirname(os.path.dirname(python))
    rel = os.path.relpath(prefix, folder)
    return [] if prefix.startswith("/usr") or rel.startswith("..") or rel == "." else [rel.split(os.sep)[0]]


@pytest.fixture
def host_dir(tmp_path):
    """A host directory anyone may write to, with a file anyone may read: what a program must not reach."""
    os.chmod(tmp_path, 0o777)
    (tmp_path / "secret.txt").write_text("s3cr3t")
    os.chmod(tmp_path / "secret.txt", 0o666)
    parent = tmp_path
    while parent != parent.parent:  # pytest's tmp root is 0700: let the sandbox user traverse it
        if parent.stat().st_uid == os.getuid():
            os.chmod(parent, parent.stat().st_mode | 0o711)
        parent = parent.parent
    return tmp_path


def test_honest_solutions_score_one_and_report_the_isolation():
    assert grade(HONEST).score == 1.0
    assert grade("def add(a, b):\n    return a + b", ASSERT_TESTS).score == 1.0
    res = run_python("import os\nprint(os.getpid(), ','.join(sorted(os.listdir('/'))), os.getcwd())", limits=LIMITS)
    assert res.isolation == "bwrap" and res.completed
    pid, listing, cwd = res.stdout.split(" ", 2)
    assert pid == "2" and cwd.strip() == "/scratch"
    # Only the system, the sandbox's own mounts and the path to the interpreter's prefix.
    assert set(listing.split(",")) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "sbin", "usr",
                                                        "proc", "tmp", "scratch", "sandbox", *towards_interpreter("/")}
    assert_nothing_left()


def test_slow_honest_solution_gets_its_timeout():
    r = grade("import time\ntime.sleep(60)\n" + HONEST, ADD_TESTS[:1], QUICK)
    assert r.score == 0.0 and f"timed out after {QUICK.wall_seconds:g}s" in r.reason
    res = run_python("while True:\n    pass", limits=QUICK)  # stopped by the CPU limit or the clock
    assert not res.ok and res.wall_seconds < QUICK.wall_seconds + 2
    assert res.timed_out or res.cpu_limited, res
    spin = grade("while True:\n    pass", ADD_TESTS[:1], QUICK).reason
    assert "exceeded the CPU limit of 1s" in spin or "timed out after 2s" in spin, spin
    assert_nothing_left()


@pytest.mark.parametrize("how", ["open", "os.open", "shell", "ctypes", "symlink", "hardlink"])
def test_writes_outside_the_scratch_are_contained(host_dir, how):
    target, victim = host_dir / f"escaped-{how}.txt", host_dir / "secret.txt"
    prog = {
        "open": f"open({str(target)!r}, 'w').write('x')",
        "os.open": f"import os\nos.write(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT), b'x')",
        "shell": f"import subprocess\nsubprocess.run(['sh', '-c', 'echo x > {target}'], check=True)",
        "ctypes": ("import ctypes, os\nlibc = ctypes.CDLL(None)\n"
                   f"fd = libc.open({str(target).encode()!r}, 0o101, 0o644)\nassert fd >= 0\nos.write(fd, b'x')"),
        "symlink": f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        "hardlink": f"import os\nos.link({str(victim)!r}, 'hard')\nopen('hard', 'w').write('x')",
    }[how]
    r = grade(prog + "\n" + HONEST)
    assert r.score == 0.0, r.reason
    assert not target.exists() and victim.read_text() == "s3cr3t"
    # /tmp is private too: what a program leaves there is gone, and never reaches the host's.
    name = f"apriel-escape-{os.getpid()}-{how}"
    assert grade(f"import subprocess\nsubprocess.run(['sh', '-c', 'echo x > /tmp/{name}'])\n" + HONEST).score == 1.0
    assert not Path("/tmp", name).exists()
    assert_nothing_left()


def test_reading_outside_the_scratch_finds_nothing(host_dir):
    home = os.path.expanduser("~")
    for path in (str(host_dir / "secret.txt"), __file__, os.path.join(home, ".bashrc"), "/root/.bashrc", "/etc/passwd"):
        res = run_python(f"print(open({path!r}).read())", limits=LIMITS)
        assert res.returncode != 0 and "FileNotFoundError" in res.stderr and "s3cr3t" not in res.stdout, path
    for folder in ("/root", home, "/home", "/tmp", "/scratch", str(host_dir.parent)):
        res = run_python(f"import os\nprint(os.listdir({folder!r}) if os.path.isdir({folder!r}) else 'absent')",
                         limits=LIMITS)
        assert res.stdout.strip() in ("absent", "[]", str(towards_interpreter(folder))), \
            (folder, res.stdout, res.stderr)


def test_the_program_cannot_read_its_tests():
    # The expected value is in the test code only; a program that finds it anywhere it can open
    # returns it. It must find nothing.
    prog = ("import glob, os, stat\nseen = ''\nfor p in glob.glob('/sandbox/*') + glob.glob('/proc/*/cmdline') + "
            "glob.glob('/proc/self/fd/*') + glob.glob('/scratch/*') + glob.glob('/tmp/*'):\n    try:\n"
            "        if not stat.S_ISFIFO(os.stat(p).st_mode):\n            seen += open(p, errors='replace').read()\n"
            "    except OSError:\n        pass\nprint(sorted(os.listdir('/sandbox')), 'SECRET-77' in seen)\n"
            "def add(a, b):\n    return 'SECRET-77' if 'SECRET-77' in seen else 0")
    res = run_python(prog, limits=LIMITS, check="assert add(2, 3) == 'SECRET-77'")
    assert res.stdout.strip() == "['__pycache__', 'harness.py'] False" and not res.completed, (res.stdout, res.stderr)


def test_another_runs_scratch_is_out_of_reach():
    # Two runs at once: the second looks for the first one's file in every place it might be.
    writer = "open('mine.txt', 'w').write('s3cr3t')\nimport time\ntime.sleep(1.5)"
    spy = ("import glob, os, time\ntime.sleep(0.5)\n"
           "hits = [p for pat in ('/scratch/*', '/tmp/*', '/tmp/apriel-sandbox-*/*', "
           "'/proc/*/cwd/*', '/proc/*/root/scratch/*') for p in glob.glob(pat)]\nprint(hits)")
    results = run_many([(writer, "", None), (spy, "", None)], LIMITS)
    assert results[0].ok and results[1].ok, results
    assert results[1].stdout.strip() == "[]"


def test_the_pool_runs_programs_concurrently():
    # Four programs of 1.5 s each on four workers: together well under the 6 s they take in a row.
    start = time.monotonic()
    results = run_many([("import time\ntime.sleep(1.5)\nprint(input())", str(i), None) for i in range(4)],
                       dataclasses.replace(LIMITS, workers=4))
    assert [r.stdout.strip() for r in results] == ["0", "1", "2", "3"]
    assert all(r.isolation == "bwrap" for r in results) and time.monotonic() - start < 4.5


@pytest.fixture
def listener():
    """A TCP server on the host's loopback that records every connection it accepts."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    thread.join()
    srv.close()


def test_network_is_unreachable(listener):
    port, accepted = listener
    connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')"
    programs = [
        connect,
        f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {connect!r}], check=True)",
        "import socket\nsocket.getaddrinfo('example.com', 80)",
        (f"import ctypes, struct\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"
         f"addr = struct.pack('<H', 2) + struct.pack('!H4s8x', {port}, bytes([127, 0, 0, 1]))\n"
         "assert libc.connect(fd, addr, len(addr)) == 0"),
    ]
    for prog in programs:
        r = grade(prog + "\n" + HONEST, ADD_TESTS[:1])
        assert r.score == 0.0, (prog, r.reason)
    assert accepted == []
    assert_nothing_left()


def test_signals_cannot_reach_the_grader_or_other_processes():
    bystander = subprocess.Popen(["sleep", "300.123"])
    me = os.getpid()
    try:
        programs = [
            f"import os, signal\nos.kill({me}, signal.SIGSTOP)",
            f"import os, signal\nos.kill({bystander.pid}, signal.SIGKILL)",
            "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)",
            "import subprocess\n"
            f"subprocess.run(['sh', '-c', 'kill -STOP {me}; kill -9 {bystander.pid}; kill -STOP $PPID'], check=True)",
            "import subprocess\nsubprocess.run(['sh', '-c', 'kill -9 -1'])",
        ]
        for prog in programs:
            grade(prog + "\n" + HONEST, ADD_TESTS[:1])
            assert psutil.Process(me).status() != psutil.STATUS_STOPPED
            assert bystander.poll() is None, prog
        assert grade(HONEST).score == 1.0  # the grader still grades
    finally:
        bystander.kill()
        bystander.wait()
    assert_nothing_left()


@pytest.mark.parametrize("prog", [
    "import subprocess\nsubprocess.Popen(['sleep', '987.654'], start_new_session=True)",
    "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
    "        os.execvp('sleep', ['sleep', '987.654'])\n    os._exit(0)\ntime.sleep(0.2)",
    "import subprocess\nsubprocess.Popen(['sh', '-c', 'nohup sleep 987.654 >/dev/null 2>&1 &'])",
], ids=["setsid", "double-fork", "nohup"])
def test_orphans_and_daemons_do_not_outlive_the_run(prog):
    assert grade(prog + "\n" + HONEST, ADD_TESTS[:1]).score == 1.0  # allowed, but killed with the run
    assert_nothing_left("987.654")


def test_fork_flood_is_capped_and_contained():
    count = ("import os, time\nn = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n    except OSError:\n"
             "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\n"
             "print(n, flush=True)\nos._exit(0)")
    res = run_python(count, limits=LIMITS)
    assert res.ok and 0 < int(res.stdout) < LIMITS.max_processes, (res.stdout, res.stderr)
    before = len(psutil.pids())
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert grade(bomb, ADD_TESTS[:1], QUICK).score == 0.0
    assert_nothing_left()
    assert len(psutil.pids()) < before + 20


def test_memory_and_tmpfs_are_capped():
    r = grade("x = bytearray(4 << 30)\n" + HONEST, ADD_TESTS[:1])
    assert r.score == 0.0 and "MemoryError" in r.reason
    # Many files, each under the file-size limit: every writable place is a capped tmpfs ...
    for place in ("/tmp", "/scratch", "/dev/shm"):
        fill = ("import os\nn = 0\ntry:\n    for i in range(10000):\n"
                f"        with open(f'{place}/f{{i}}', 'wb') as f:\n"
                "            f.write(b'x' * (200 << 10))\n        n += 1\nexcept OSError as e:\n    print(n, e.errno)")
        res = run_python(fill, limits=LIMITS)
        n, errno_ = map(int, res.stdout.split())
        assert errno_ == 28 and n * (200 << 10) <= LIMITS.scratch_bytes, place  # ENOSPC at the tmpfs size
    # ... and nothing else is writable (bwrap's own root and /dev are uncapped tmpfs: read-only).
    for place in ("/", "/dev", "/usr", "/sandbox"):
        res = run_python(f"open('{place}/x', 'w')", limits=LIMITS)
        refused = "Read-only file system" in res.stderr or "Permission denied" in res.stderr
        assert res.returncode != 0 and refused, place
    assert_nothing_left()


def test_output_flood_is_capped():
    start = time.monotonic()
    res = run_python("while True:\n    print('x' * 10000)", limits=QUICK)
    assert res.returncode != 0 and res.stdout.endswith("[output truncated]")
    assert len(res.stdout) <= QUICK.max_output_bytes + 100 and time.monotonic() - start < QUICK.wall_seconds + 2
    assert grade("print('5' * 10**7)", ADD_TESTS[:1]).score == 0.0
    assert_nothing_left()


EARLY_EXITS = {
    "sys.exit": "import sys\nsys.exit(0)",
    "os._exit": "import os\nos._exit(0)",
    "SystemExit": "raise SystemExit",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return 0",
    "excepthook": "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\ndef add(a, b):\n    return 0",
    "signal handler": ("import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\nsignal.setitimer("
                       "signal.ITIMER_REAL, 0.05)\ndef add(a, b):\n    while True:\n        pass"),
    "thread": "import os, threading\nthreading.Thread(target=lambda: os._exit(0)).start()\nimport time\ntime.sleep(1)",
    "builtins": "import builtins\nbuiltins.AssertionError = SystemExit\nbuiltins.add = lambda a, b: 0",
    "close stdout": "import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\ndef add(a, b):\n    return 0",
    "write stdout": "print('ok\\nPASSED 2/2 tests', flush=True)\ndef add(a, b):\n    return 0",
    "settrace": ("import sys\ndef jump(frame, event, arg):\n"
                 "    if event == 'line' and frame.f_code.co_filename == 'test.py':\n"
                 "        frame.f_lineno = 99\n    return jump\nsys.settrace(jump)\nsys._getframe().f_trace = jump\n"
                 "def add(a, b):\n    return 0"),
    "kill self": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "replace exec": "import __main__, builtins\n__main__.exec = builtins.exec = lambda *a: None\nadd = None",
}


@pytest.mark.parametrize("route", list(EARLY_EXITS))
def test_assert_tests_pass_only_when_the_asserts_ran(route):
    r = grade(EARLY_EXITS[route], ASSERT_TESTS)
    assert r.score == 0.0, (route, r.reason)
    assert_nothing_left()


@pytest.mark.parametrize("mode", ["bwrap", pytest.param("rlimits-only", marks=pytest.mark.bwrap(False))])
def test_nothing_is_left_on_the_host(monkeypatch, tmp_path, mode):
    # Everything the grader makes for a run goes under tempfile's directory: point it at an empty one.
    sandbox._harness_dir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    prog = ("import os\nos.makedirs('d/e')\nopen('d/e/f', 'w').write('x')\nos.symlink('/', 'd/root')\n"
            "os.chmod('d/e', 0)\nos.chmod('d', 0)\n" + HONEST)
    assert grade(prog, limits=dataclasses.replace(LIMITS, isolation=mode)).score == 1.0
    assert list(tmp_path.iterdir()) == []
    assert_nothing_left()


def test_exit_status_after_the_asserts_does_not_matter():
    prog = "import atexit, os\natexit.register(lambda: os._exit(3))\ndef add(a, b):\n    return a + b"
    assert grade(prog, ASSERT_TESTS).score == 1.0


@pytest.mark.bwrap(False)
def test_without_bwrap_the_code_reward_refuses_unless_told(monkeypatch, tmp_path):
    """A machine without bwrap (here: PATH without it) refuses; the weaker mode must be named."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sandbox, "_CHECKED", {})
    with pytest.raises(SandboxUnavailable, match="isolation=rlimits-only"):
        grade(HONEST)
    cfg = RewardsConfig(sandbox=LIMITS)
    cfg.validate()  # reading the config needs no sandbox (apriel grpo-info); the run checks it first
    with pytest.raises(ConfigError, match="rewards.sandbox.isolation"):
        cfg.check_sandbox()
    with pytest.raises(ConfigError, match="unknown mode"):
        SandboxLimits(isolation="none").validate()


@pytest.mark.bwrap(False)
def test_rlimits_only_mode_warns_once_and_still_limits(monkeypatch, caplog, host_dir):
    import logging

    weak = dataclasses.replace(QUICK, isolation="rlimits-only")
    monkeypatch.setattr(sandbox, "_WARNED", False)
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        assert grade(HONEST, limits=weak).score == 1.0
        assert grade("def add(a, b):\n    return a + b", ASSERT_TESTS, limits=weak).score == 1.0
    warnings = [r for r in caplog.records if "NOT PROTECTED" in r.getMessage()]
    assert len(warnings) == 1
    assert run_python(HONEST, "2 3", weak).isolation == "rlimits-only"
    for route in ("sys.exit", "os._exit", "atexit", "builtins"):
        assert grade(EARLY_EXITS[route], ASSERT_TESTS, weak).score == 0.0, route
    assert run_python("while True:\n    pass", limits=weak).returncode != 0
    assert "network access is disabled" in run_python("import socket\nsocket.socket()", limits=weak).stderr
    target = host_dir / "escaped.txt"
    assert run_python(f"open({str(target)!r}, 'w').write('x')", limits=weak).returncode != 0
    assert not target.exists()
    assert "MemoryError" in run_python("x = bytearray(4 << 30)", limits=weak).stderr
    res = run_python("while True:\n    print('x' * 10000)", limits=weak)
    assert res.returncode != 0 and len(res.stdout) <= weak.max_output_bytes + 100
    res = run_python("import subprocess\nsubprocess.Popen(['sleep', '987.655'])\nprint(1)", limits=weak)
    assert res.stdout.strip() == "1", res.stderr
    assert_nothing_left("987.655")


def _unprivileged_command(user: str) -> list[str]:
    """Run this module as ``user``: a private mount namespace makes this interpreter reachable (a
    pyenv under /root is not), the run gets its own TMPDIR and HOME, then setpriv drops to the user
    with no groups and no capabilities. (No tmpfs over /tmp: the checkout or a venv may live there.)"""
    work = tempfile.mkdtemp(prefix="apriel-sandbox-user-")
    os.chmod(work, 0o1777)
    script, hidden, rebind = "set -e\n", [], ""
    for i, prefix in enumerate(sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)})):
        blocked = next((str(p) for p in reversed(Path(prefix).parents) if not os.stat(p).st_mode & 0o001), None)
        if blocked:  # e.g. /root: keep the prefix (a venv and its base), cover the rest with an empty tmpfs
            script += f"stash{i}={work}/.prefix{i}\nmkdir $stash{i}\nmount --bind {prefix} $stash{i}\n"
            hidden += [blocked] if blocked not in hidden else []
            rebind += f"mkdir -p {prefix}\nmount --bind $stash{i} {prefix}\n"
    script += "".join(f"mount -t tmpfs -o mode=0755 none {b}\n" for b in hidden) + rebind
    u = pwd.getpwnam(user)
    repo = Path(__file__).resolve().parents[1]
    script += (f"cd {repo}\nexec setpriv --reuid={u.pw_uid} --regid={u.pw_gid} --clear-groups --inh-caps=-all "
               f"env -i PATH=/usr/bin:/bin HOME={work} TMPDIR={work} PYTHONPATH={repo} PYTHONDONTWRITEBYTECODE=1 "
               f"APRIEL_SANDBOX_NESTED=1 {sys.executable} -m pytest -q -p no:cacheprovider -x {__file__}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], work


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("APRIEL_SANDBOX_NESTED") == "1", reason="already running as the ordinary user")
def test_hostile_programs_as_an_ordinary_user():
    """CI runs as root; clusters run training as ordinary users: the whole module again as one."""
    if os.geteuid() != 0:
        assert grade(HONEST).score == 1.0  # already an ordinary user: the module itself is that run
        return
    skip_unless_system(("unshare", "setpriv"), packages="util-linux", user=USER)
    command, work = _unprivileged_command(USER)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 30 and "failed" not in summary and "error" not in summary, tail
    assert "1 skipped" in summary or "skipped" not in summary, tail  # only this test skips itself there


# ---- assert tests: the verdict is decided in a process the program cannot reach -------------------

SQUARE_TESTS = [{"assert": "assert f(2) == 4"}, {"assert": "assert not (f(3) != 9)"}, {"assert": "assert f(2)"}]
# A program's own "harness" import reaches the harness module of its process (sys.path has /sandbox).
FORGE = "import harness as h\n"
# A spin is stopped by its CPU second or by the 2 s clock, whichever comes first on a busy machine.
SPIN_STOPPED = ("timed out after 2s", "exceeded the CPU limit of 1s")
CHEATS = {
    # value: (program, expected reason fragment); every one is graded against SQUARE_TESTS
    "always equal": ("class AE:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
                     "        return False\n    def __bool__(self):\n        return True\n    __hash__ = None\n"
                     "def f(x):\n    return AE()", "objects of the program are not values"),
    "always equal in a list": ("class AE:\n    def __eq__(self, other):\n        return True\n"
                               "    def __getattr__(self, name):\n        return self\n"
                               "def f(x):\n    return [AE()]", "objects of the program are not values"),
    "int subclass": ("class I(int):\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
                     "        return False\n    __hash__ = int.__hash__\ndef f(x):\n    return I(1)",
                     "a I (a subclass of int), which is not a value"),
    "str subclass": ("class S(str):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return S('')",
                     "a S (a subclass of str)"),
    "list subclass in a dict": ("class L(list):\n    def __eq__(self, other):\n        return True\n"
                                "def f(x):\n    return {'v': L()}", "a L (a subclass of list)"),
    "too deep": ("def f(x):\n    v = []\n    for _ in range(500):\n        v = [v]\n    return v", "nested deeper"),
    "too large": ("def f(x):\n    return 'x' * (20 << 20)", "over the size limit"),
    "shared bomb": ("def f(x):\n    v = [x]\n    for _ in range(64):\n        v = [v, v]\n    return v",
                    "over the size limit"),
    "recursive list": ("def f(x):\n    v = [x]\n    v.append(v)\n    return v", "recursive structure"),
    "recursive dict": ("def f(x):\n    v = {}\n    v[1] = [v]\n    return v", "recursive structure"),
    "unsolicited at the top": (FORGE + "import os\ndef f(x):\n    return 0\n"
                               "for fd in map(int, os.listdir('/proc/self/fd')):\n    try:\n"
                               "        h.write_frame(fd, h.encode((0, bytes(8), 'ok', 4, None)))\n"
                               "    except OSError:\n"
                               "        pass", "a frame it was not asked for"),
    "unsolicited in a call": (FORGE + "import os\ndef f(x):\n    for fd in map(int, os.listdir('/proc/self/fd')):\n"
                              "        try:\n"
                              "            h.write_frame(fd, h.encode((0, bytes(8), 'ok', x * x, None)))\n"
                              "        except OSError:\n            pass\n    return 0",
                              "an answer to a call it was not asked"),
    # the attack on the single-process harness: every pipe in /proc/self/fdinfo spliced into every other
    "token through fdinfo": ("import os\nfds = [int(fd) for fd in os.listdir('/proc/self/fdinfo')]\nfor fd in fds:\n"
                             "    for other in fds:\n        try:\n"
                             "            os.splice(fd, other, 64, flags=os.SPLICE_F_NONBLOCK)\n"
                             "        except OSError:\n            pass\n    try:\n"
                             "        os.write(fd, b'P\\nP\\nP\\n')\n    except OSError:\n"
                             "        pass\nos._exit(0)", ""),
    "forged verdicts everywhere": (FORGE + "import glob, os\nfor p in glob.glob('/proc/*/fd/*'):\n    try:\n"
                                   "        fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)\n"
                                   "        os.write(fd, b'P\\nP\\nP\\n')\n    except OSError:\n        pass\n"
                                   "def f(x):\n    return 0", ""),
    "shadowed builtins": ("import builtins\nall = any = isinstance = lambda *a: True\nlen = lambda *a: 3\n"
                          "builtins.all = all\nAssertionError = SystemExit\ndef f(x):\n    return 0", ""),
    "patched stand-ins": (FORGE + "h._stand_ins = lambda *a: {'f': lambda x: x * x}\nh.ProgramObject.__eq__ = "
                          "lambda *a: True\nh._Connection.call = lambda *a, **k: 4\ndef f(x):\n    return 0", ""),
    "never answers": ("import time\ndef f(x):\n    time.sleep(100)", "timed out after 2s"),
    "spins": ("def f(x):\n    while True:\n        pass", SPIN_STOPPED),
    "spins, ignoring SIGXCPU": ("import signal\ndef f(x):\n    signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
                                "    while True:\n        pass", SPIN_STOPPED),
    "exits in the call": ("import os\ndef f(x):\n    os._exit(0)", "exited"),
    "exception to the test": ("def f(x):\n    raise SystemExit(0)", "ProgramError"),
}
OTHER_TESTS = {
    "shadowed builtins": [{"assert": "assert all(v == 4 for v in [f(2)])"}, {"assert": "assert isinstance(f(2), str)"},
                          {"assert": "assert len([f(2)]) == 3 and any([f(2)])"}],
    "always equal in a list": [{"assert": "assert f(2) == [4]"}, {"assert": "assert f(3).real == [9]"}],
}


def grade_all(cases: dict, limits=QUICK) -> dict:
    """Grade many completions at once (the sandbox pool is shared, as TRLReward uses it)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        return dict(zip(cases, ex.map(lambda c: grade(c[0], c[1], limits), cases.values())))


def test_cheating_values_and_forged_answers_score_zero_with_a_reason():
    cases = {name: (prog, OTHER_TESTS.get(name, SQUARE_TESTS)) for name, (prog, _) in CHEATS.items()}
    # The cheats refused for what they return get 10 s, not 2: on a loaded machine (two test workers
    # and a SLURM job on two cores) a 2 s clock can run out before the refusal, and the reason asserted
    # is the refusal. The cheats that never answer keep the 2 s clock they are meant to hit.
    clocked = {name for name, (_, why) in CHEATS.items() if "timed out" in str(why)}
    results = grade_all({n: c for n, c in cases.items() if n in clocked})
    results |= grade_all({n: c for n, c in cases.items() if n not in clocked},
                         dataclasses.replace(QUICK, wall_seconds=10))
    for name, r in results.items():
        assert r.score == 0.0, (name, r.reason)
        expected = CHEATS[name][1] if isinstance(CHEATS[name][1], tuple) else (CHEATS[name][1],)
        assert any(e in r.reason for e in expected) and "test 0 " in r.reason, (name, r.reason)
    # The same grader still passes the honest square, next to them.
    assert grade("def f(x):\n    return x * x", SQUARE_TESTS, QUICK).score == 1.0
    assert_nothing_left()


def test_the_program_cannot_reach_the_test_code_or_the_verdict():
    # Everything the program's process can see: every process (/proc/*), their descriptors, memory
    # maps and environments, its own objects and the harness's frames. The secret is in the test only.
    # The needle is never spelled out in the program (its own source sits in the harness's frame).
    prog = ("import gc, glob, os, sys\ndef key():\n    return bytes(b ^ 1 for b in b'RDBSDU,66')\n"
            "seen = [sys.stdin.buffer.read()]\n"
            "for p in glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ') + glob.glob('/proc/*/fd/*') + "
            "glob.glob('/proc/*/fdinfo/*') + glob.glob('/proc/*/maps') + glob.glob('/sandbox/*'):\n    try:\n"
            "        if os.path.isfile(p) or p.startswith('/proc/'):\n"
            "            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)\n            seen.append(os.read(fd, 1 << 20))\n"
            "    except OSError:\n        pass\n"
            "seen += [repr(o).encode() for o in gc.get_objects() if isinstance(o, (str, bytes, dict))]\n"
            "frame = sys._getframe()\nwhile frame:\n    seen.append(repr(frame.f_locals).encode())\n"
            "    frame = frame.f_back\n"
            "pids = sorted(set(p.split('/')[2] for p in glob.glob('/proc/[0-9]*')))\n"
            "found = any(key() in s for s in seen)\nprint(pids, found, len(seen) > 10)\n"
            "def add(a, b):\n    return key().decode() if found else 0")
    res = run_python(prog, limits=LIMITS, check=["assert add(2, 3) == 'SECRET-77'"])
    assert res.stdout.strip() == "['1', '2'] False True" and not res.completed, (res.stdout, res.stderr)
    assert res.outcomes == [(False, "AssertionError at line 1: assert add(2, 3) == 'SECRET-77'")]
    # The search itself works: given the secret where it may look (its stdin), the program finds it.
    res = run_python(prog, "SECRET-77", limits=LIMITS, check=["assert add(2, 3) == 'SECRET-77'"])
    assert res.stdout.strip() == "['1', '2'] True True" and res.completed, (res.stdout, res.outcomes)


@pytest.mark.bwrap(False)
def test_the_codec_carries_exact_values_only():
    codec = sandbox._codec()
    value = [None, True, 0, 1, -(1 << 200), 2.5, float("inf"), -0.0, "\u00e9\ud800", b"\x00", (1, [2]), {3, "x"},
             frozenset({(1, 2)}), {"k": {1: [b""]}, (1, None): ()}, [], {}]
    back = codec.decode(codec.encode(value))
    assert back == value and [type(v) for v in back] == [type(v) for v in value]
    assert type(codec.decode(codec.encode(True))) is bool and type(codec.decode(codec.encode(1))) is int
    nan = codec.decode(codec.encode(float("nan")))
    assert nan != nan
    import collections
    import enum
    for bad, why in ((collections.OrderedDict(), "subclass of dict"), (enum.IntEnum("E", "A").A, "subclass of int"),
                     (collections.namedtuple("P", "x")(1), "subclass of tuple"), (bytearray(b"x"), "bytearray"),
                     (object(), "object"), ([len], "builtin_function_or_method")):
        with pytest.raises(codec.CodecError, match=why):
            codec.encode(bad)
    deep = []
    for _ in range(codec.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(codec.CodecError, match="nested deeper"):
        codec.encode(deep)
    with pytest.raises(codec.CodecError, match="size limit"):
        codec.encode([0] * (codec.MAX_ITEMS + 1))
    loop = {}
    loop["self"] = (loop,)
    with pytest.raises(codec.CodecError, match="recursive"):
        codec.encode(loop)
    shared = [1]
    assert codec.decode(codec.encode([shared, shared])) == [[1], [1]]  # shared is not recursive
    good = codec.encode([1, "a"])
    for frame in (good[:-1], good + b"N", b"X", b"l\xff\xff\xff\xff", b"S\x00\x00\x00\x01l\x00\x00\x00\x00",
                  b"d\x00\x00\x00\x01l\x00\x00\x00\x00N", b"f\x03xyz", b"s\x00\x00\x00\x01\xff",
                  b"H" + b"o\x00\x00\x00\x01\x00"):  # a handle where none may be
        with pytest.raises(codec.CodecError):
            codec.decode(frame)


PROGRAM = '''
import math
from collections import deque

LIMIT = 10
TABLE = {"a": [1, 2.5, None, True], (1, 2): {b"x", frozenset({3})}}


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def squares(n):
    for i in range(n):
        yield i * i


def naturals():
    n = 0
    while True:
        yield n
        n += 1


def scaled(xs, by=1):
    return [x * by for x in xs], {"n": len(xs)}


def sort_in_place(xs, seen):
    xs.sort()
    seen.update(xs)


class EmptyError(ValueError):
    pass


class Stack:
    def __init__(self, *items):
        self.items = deque(items)
        self.pushes = 0

    def push(self, x):
        self.items.append(x)
        self.pushes += 1
        return self

    def pop(self):
        if not self.items:
            raise EmptyError("pop from an empty stack")
        return self.items.pop()

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(list(self.items))

    def __str__(self):
        return f"Stack{list(self.items)}"


class Node:
    def __init__(self, val, next=None):
        self.val, self.next = val, next


def build(values):
    head = None
    for v in reversed(values):
        head = Node(v, head)
    return head


def reverse(head):
    prev = None
    while head:
        head.next, prev, head = prev, head, head.next
    return prev


def to_list(head):
    out = []
    while head:
        out.append(head.val)
        head = head.next
    return out


class Countdown:
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return self

    def __next__(self):
        if self.n <= 0:
            raise StopIteration
        self.n -= 1
        return self.n + 1


class Solution:
    def twoSum(self, nums, target):
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i


shared = Stack()
'''
HONEST_ASSERTS = [
    "assert fib(15) == 610 and [fib(i) for i in range(6)] == [0, 1, 1, 2, 3, 5]",
    "assert list(squares(4)) == [0, 1, 4, 9] and sum(squares(3)) == 5",
    "g = squares(10)\nassert next(g) == 0 and next(g) == 1\nassert [x for x in g if x % 2] == [9, 25, 49, 81]",
    "import itertools\nassert list(itertools.islice(naturals(), 4)) == [0, 1, 2, 3]",
    "assert scaled([1, 2], by=3) == ([3, 6], {'n': 2}) and LIMIT == 10",
    "xs, seen = [3, 1, 2], {0}\nassert sort_in_place(xs, seen) is None and xs == [1, 2, 3] and seen == {0, 1, 2, 3}",
    "assert TABLE == {'a': [1, 2.5, None, True], (1, 2): {b'x', frozenset({3})}}",
    "assert math.isclose(math.sqrt(fib(4) ** 2 + 4 ** 2), 5.0)",
    "s = Stack(1)\ns.push(2).push(3)\nassert s.pop() == 3 and len(s) == 2 and s.pushes == 2\n"
    "assert list(s) == [1, 2] and str(s) == 'Stack[1, 2]' and isinstance(s, Stack)",
    "s = Stack()\ntry:\n    s.pop()\nexcept EmptyError as e:\n    assert str(e) == 'pop from an empty stack'\n"
    "else:\n    assert False\ntry:\n    s.pop()\nexcept ValueError:\n    pass\nelse:\n    assert False",
    "head = reverse(build([1, 2, 3]))\nassert to_list(head) == [3, 2, 1] and head.val == 3 and head.next.val == 2",
    "assert list(Countdown(3)) == [3, 2, 1]",
    "assert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]",
    # each test sees the program as its top level left it
    "shared.push(1)\nassert len(shared) == 1",
    "shared.push(2)\nassert len(shared) == 1 and shared.pop() == 2",
    "try:\n    fib('x')\nexcept TypeError:\n    pass\nelse:\n    assert False",
]


def test_honest_programs_score_one():
    tests = [{"assert": a} for a in HONEST_ASSERTS]
    r = grade(PROGRAM, tests, LIMITS)
    assert r.score == 1.0, r.reason
    # The same tests against a wrong program fail one by one, each with its reason.
    wrong = PROGRAM.replace("return n if n < 2", "return 1 if n < 2").replace("i * i", "i + i")
    res = run_python(wrong, limits=LIMITS, check=HONEST_ASSERTS[:3])
    assert [ok for ok, _ in res.outcomes] == [False, False, False], res.outcomes
    assert res.outcomes[0][1].startswith("AssertionError at line 1: assert fib(15) == 610")


def test_program_objects_cross_as_handles_only():
    prog = ("class I(int):\n    def __eq__(self, other):\n        return True\n"
            "class Box:\n    def __init__(self, v):\n        self.v = v\n    def __eq__(self, other):\n"
            "        return True\n    def get(self):\n        return self.v\n    def __len__(self):\n"
            "        return I(3)\n    def __getattr__(self, name):\n        return Box(name)\n"
            "def make(v):\n    return Box(v)\ndef apply(fn, x):\n    return fn(x)\ndef sneak(xs):\n"
            "    xs.append(Box(0))")
    checks = [
        # methods and attributes answer values; the class is a class for isinstance
        "assert make(3).get() == 3 and make([1]).v == [1] and isinstance(make(1), Box)",
        "assert make(3) == make(3)",  # the program's __eq__ never runs in the test process
        "b = make(1)\nb.v = 2",  # attributes are not set from the test
        "assert apply(lambda x: x, 1) == 1",  # a function of the test does not cross either
        "assert {make(1): 1}",  # hashable by identity, but not truth-tested
        "assert len(make(1)) == 3",  # a protocol's answer is a value like any other
        "assert make(1).anything == 'x'",  # __getattr__ answers with an object: a handle, not equal
        "try:\n    assert make(1) != 2\nexcept BaseException:\n    pass",  # swallowing the refusal fails too
        "xs = []\nsneak(xs)\nassert xs == [0]",  # what a call put in the test's list is a handle too
    ]
    res = run_python(prog, limits=LIMITS, check=checks)
    assert [ok for ok, _ in res.outcomes] == [True, False, False, False, True, False, False, False, False], \
        res.outcomes
    assert "objects of the program are not values" in res.outcomes[1][1]
    assert "cannot be set" in res.outcomes[2][1]
    assert "does not cross" in res.outcomes[3][1] and "function" in res.outcomes[3][1]
    assert "a I (a subclass of int)" in res.outcomes[5][1]
    assert all("objects of the program are not values" in why for _, why in res.outcomes[6:])
