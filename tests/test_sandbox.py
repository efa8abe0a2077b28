"""The code sandbox contains hostile programs: each scores zero, stays within its limits and leaves
no process behind."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from megatron_apriel.rl.rewards import SandboxLimits, code_reward, run_python
from megatron_apriel.rl.rewards.sandbox import isolation_available

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5, memory_bytes=512 << 20, max_processes=8,
                       max_file_bytes=256 << 10, max_output_bytes=4096)
ADD_TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6\n"}]


def answer(program: str) -> str:
    return f"I will read two ints.\n[BEGIN FINAL RESPONSE]\n```python\n{program}\n```\n[END FINAL RESPONSE]"


def sandbox_processes(marker: str = "apriel-sandbox-") -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_nothing_left(marker: str = "apriel-sandbox-"):
    deadline = time.time() + 3
    while sandbox_processes(marker) and time.time() < deadline:
        time.sleep(0.1)
    assert sandbox_processes(marker) == []


def test_correct_program_passes_and_runs_unprivileged():
    r = code_reward(answer("a, b = map(int, input().split())\nprint(a + b)"), tests=ADD_TESTS, limits=LIMITS)
    assert r.score == 1.0, r.reason
    if isolation_available():
        assert run_python("import os; print(os.getuid())", limits=LIMITS).stdout.strip() == "65534"
    assert_nothing_left()


def test_infinite_loop_is_stopped_by_cpu_limit():
    start = time.monotonic()
    r = code_reward(answer("while True:\n    pass"), tests=ADD_TESTS[:1], limits=LIMITS)
    assert r.score == 0.0
    assert time.monotonic() - start < LIMITS.wall_seconds + 2
    assert_nothing_left()


def test_sleeping_program_is_stopped_by_wall_clock():
    res = run_python("import time\ntime.sleep(60)", limits=LIMITS)
    assert res.timed_out and res.wall_seconds < LIMITS.wall_seconds + 1
    assert_nothing_left()


def test_detached_background_process_is_killed():
    # setsid() escapes the process group; the PID namespace (or the session kill) must still get it.
    prog = ("import subprocess\nsubprocess.Popen(['sleep', '987.654'], start_new_session=True)\n"
            "a, b = map(int, input().split())\nprint(a + b)")
    r = code_reward(answer(prog), tests=ADD_TESTS[:1], limits=LIMITS)
    if isolation_available():
        assert r.score == 1.0, r.reason
    assert_nothing_left("987.654")


@pytest.mark.skipif(not isolation_available(), reason="RLIMIT_NPROC needs the unprivileged-user mode")
def test_process_limit_caps_forks():
    # Mild version first: count how many children a program can start.
    prog = ("import os, time\nn = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
            "    n += 1\nprint(n, flush=True)\nos._exit(0)")
    res = run_python(prog, limits=LIMITS)
    assert res.ok, res.stderr
    assert int(res.stdout.strip()) < LIMITS.max_processes
    assert_nothing_left()


@pytest.mark.skipif(not isolation_available(), reason="a fork bomb is only safe under RLIMIT_NPROC as nobody")
def test_fork_bomb_is_contained():
    before = len(psutil.pids())
    prog = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = code_reward(answer(prog), tests=ADD_TESTS[:1], limits=LIMITS)
    assert r.score == 0.0
    assert_nothing_left()
    assert len(psutil.pids()) < before + 20


def test_memory_hog_fails():
    r = code_reward(answer("x = bytearray(4 << 30)\nprint(5)"), tests=ADD_TESTS[:1], limits=LIMITS)
    assert r.score == 0.0 and "MemoryError" in r.reason
    assert_nothing_left()


def test_writing_outside_scratch_fails(tmp_path):
    os.chmod(tmp_path, 0o777)  # even a world-writable directory is refused
    target = tmp_path / "escaped.txt"
    for prog in (f"open({str(target)!r}, 'w').write('x')",
                 f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
                 "open('../program.py', 'w').write('print(5)')"):
        res = run_python(prog, limits=LIMITS)
        assert res.returncode != 0 and "PermissionError" in res.stderr, res.stderr
    assert not target.exists()
    # Inside the scratch dir writing works.
    assert run_python("open('f', 'w').write('ok')\nprint(open('f').read())", limits=LIMITS).stdout.strip() == "ok"
    assert_nothing_left()


def test_network_is_unreachable():
    res = run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", limits=LIMITS)
    assert res.returncode != 0 and "PermissionError" in res.stderr
    if isolation_available():
        # Below the audit hook: a raw socket() through libc meets an empty network namespace.
        prog = ("import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                "fd = libc.socket(2, 1, 0)\nassert fd >= 0\n"
                "addr = struct.pack('!HH4s8x', 2, 80, bytes([1, 1, 1, 1]))\n"
                "addr = struct.pack('<H', 2) + addr[2:]\n"
                "rc = libc.connect(fd, addr, len(addr))\nprint(rc, ctypes.get_errno())")
        res = run_python(prog, limits=LIMITS)
        assert res.ok, res.stderr
        rc, errno_ = map(int, res.stdout.split())
        assert rc == -1 and errno_ == 101  # ENETUNREACH
    assert_nothing_left()


def test_huge_print_is_capped():
    start = time.monotonic()
    res = run_python("while True:\n    print('x' * 10000)", limits=LIMITS)
    assert res.returncode != 0
    assert len(res.stdout) <= LIMITS.max_output_bytes + 100 and res.stdout.endswith("[output truncated]")
    assert time.monotonic() - start < LIMITS.wall_seconds + 2
    r = code_reward(answer("print('5' * 10**7)"), tests=ADD_TESTS[:1], limits=LIMITS)
    assert r.score == 0.0
    assert_nothing_left()


def test_fallback_mode_without_namespaces(monkeypatch, tmp_path):
    """Where namespaces are unavailable (not root), rlimits, the audit hook and the process-group kill
    still contain the same programs (the fork bomb is left out: as root RLIMIT_NPROC would not hold)."""
    from megatron_apriel.rl.rewards import sandbox

    monkeypatch.setattr(sandbox, "_ISOLATION_CHECKED", False)
    assert run_python("print(sum(map(int, input().split())))", "2 3", LIMITS).stdout.strip() == "5"
    assert run_python("while True:\n    pass", limits=LIMITS).returncode != 0
    res = run_python("import socket\nsocket.socket()", limits=LIMITS)
    assert res.returncode != 0 and "network access is disabled" in res.stderr
    target = tmp_path / "escaped.txt"
    assert run_python(f"open({str(target)!r}, 'w').write('x')", limits=LIMITS).returncode != 0
    assert not target.exists()
    assert "MemoryError" in run_python("x = bytearray(4 << 30)", limits=LIMITS).stderr
    assert run_python("import os\nos.kill(os.getppid(), 9)", limits=LIMITS).returncode != 0
    res = run_python("while True:\n    print('x' * 10000)", limits=LIMITS)
    assert res.returncode != 0 and len(res.stdout) <= LIMITS.max_output_bytes + 100
    prog = "import subprocess\nsubprocess.Popen(['sleep', '987.655'])\nprint(1)"
    assert run_python(prog, limits=LIMITS).stdout.strip() == "1"
    assert_nothing_left("987.655")
