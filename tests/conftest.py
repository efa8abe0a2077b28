"""Shared fixtures: tiny HF models written to disk, an in-process world of one, torchrun launcher."""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the checkout first, then whatever the caller had (packages installed with --target, say)
REPO_PYTHONPATH = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


# What a test that needs a missing system package says when it skips: the one script that installs
# them all (.ci/run runs it too), and the Debian package itself.
INSTALL_HINT = "sudo scripts/install-system-packages.sh"


def skip_unless_system(binaries: tuple[str, ...] = (), packages: str = "", user: str | None = None) -> None:
    """Skip the calling test where a system binary or user it needs is absent, naming the install line."""
    missing = [b for b in binaries if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            missing.append(f"the user {user}")
    if missing:
        apt = f" (apt-get install {packages})" if packages else ""
        pytest.skip(f"missing {', '.join(missing)}: {INSTALL_HINT}{apt}")


@functools.lru_cache(maxsize=1)
def _bwrap_unavailable() -> str:
    """Why the code sandbox cannot use bubblewrap here ('' when it can): the sandbox's own check."""
    from megatron_apriel.rl.rewards import sandbox

    try:
        sandbox.isolation_mode()
    except sandbox.SandboxUnavailable as e:
        return str(e)
    return ""


def pytest_runtest_setup(item):
    """``@pytest.mark.bwrap``: the test runs programs in the bubblewrap sandbox; where bwrap is not
    installed (or cannot start) it skips with the install line rather than failing. The closest
    marker wins, so ``bwrap(False)`` exempts one test of a module marked as a whole."""
    marker = item.get_closest_marker("bwrap")
    if marker is None or (marker.args and not marker.args[0]):
        return
    if shutil.which("bwrap") is None:
        pytest.skip(f"missing bwrap: {INSTALL_HINT} (apt-get install bubblewrap)")
    why = _bwrap_unavailable()
    if why:
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | os.PathLike, args: list[str], nproc: int = 2, timeout: int = 600,
                 env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with ``nproc`` processes on this machine (gloo, CPU)."""
    # --standalone: torchrun's agent binds a free port itself (a port found free here could be
    # taken before the agent binds it, by another test's gloo connections)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_PYTHONPATH, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} {args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def run_python(args: list[str], timeout: int = 600, env: dict | None = None, check: bool = True
               ) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH, **(env or {})}
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"python {args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def make_tiny_hf(path: Path, seed: int = 0, **changes) -> Path:
    """A random tiny MistralForCausalLM saved with save_pretrained.

    initializer_range 0.1 (not 0.02) makes every layer change the logits materially, so a wrong
    tensor layout shows up far above the 1e-5 parity tolerance.
    """
    from transformers import MistralForCausalLM

    from megatron_apriel.models import get_preset

    preset = get_preset("tiny", **({"vocab_size": 500} | changes))
    torch.manual_seed(seed)
    model = MistralForCausalLM(preset.hf_config(initializer_range=0.1))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("tiny_hf") / "model")


@pytest.fixture(scope="session")
def dist_world_of_one():
    """torch.distributed and megatron-core parallel state for this pytest process (TP=PP=1, CPU)."""
    from megatron_apriel.runtime import init_distributed

    return init_distributed(device="cpu", seed=1234)


def pytest_collection_modifyitems(config, items):
    """The code-sandbox and reward tests run first, on a fresh pytest process.

    Their hostile programs are bounded by a few seconds of wall clock and a handful of processes
    per run; late in a full run, after hundreds of tests have left threads, caches and child
    processes behind in this process, some of those bounds were hit by honest programs (the tests
    pass alone and in any group of the modules that use the sandbox). Running them first keeps
    their limits tight instead of loosening them for the sake of the suite."""
    order = {name: i for i, name in enumerate(FIRST + LONGEST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: order kept otherwise


# The README's test command runs the suite on two pytest-xdist workers, a module to a worker
# (``--dist loadfile --no-loadscope-reorder``: a module's fixtures are made once, and the modules
# go out in this order). The sandbox and reward modules lead (see above); the longest modules follow,
# so that the two workers end together rather than one of them starting the slowest module last.
# Longest first as measured by ``--durations`` on two cores.
FIRST = ("test_sandbox.py", "test_rewards.py")
LONGEST = ("test_slurm.py", "test_grpo_scale.py", "test_training.py", "test_slurm_multinode.py",
           "test_demo_multimodal.py", "test_demo.py", "test_grpo_vllm.py", "test_vllm_serve.py", "test_parallel.py",
           "test_faults.py", "test_llava.py", "test_multimodal_data.py", "test_float8.py", "test_convert.py")
