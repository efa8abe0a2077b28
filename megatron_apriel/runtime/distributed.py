"""Process-group setup for every entry point: torchrun, SLURM ``srun`` or one plain process.

One function, :func:`init_distributed`, reads the launcher's environment, starts torch.distributed
(NCCL on GPU, gloo on CPU), activates the CPU backend when there is no GPU, and creates
megatron-core's model-parallel groups. Everything downstream (models, optimizer, checkpoints) only
talks to megatron-core's ``parallel_state``.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from megatron_apriel.runtime import cpu_backend


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cuda" or "cpu"
    launcher: str  # "torchrun", "slurm" or "single"
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu[001-003,007],login1`` into host names.

    Written here instead of calling ``scontrol show hostnames`` so that it works inside containers
    where the SLURM client tools are absent.
    """
    hosts: list[str] = []
    # split on commas that are not inside brackets
    parts = re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def detect_launcher(environ=None) -> tuple[str, int, int, int]:
    """Return (launcher, rank, world_size, local_rank) from the environment.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK. Under ``srun`` (one task per GPU) SLURM sets
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR then defaults to the first host of the
    allocation and MASTER_PORT to a port derived from the job id so all tasks agree without talking.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return (
            "slurm",
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
        )
    return "single", 0, 1, 0


def _setup_rendezvous(launcher: str, environ=None) -> None:
    env = os.environ if environ is None else environ
    if launcher == "slurm":
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
            env["MASTER_ADDR"] = expand_slurm_nodelist(nodelist)[0]
        if "MASTER_PORT" not in env:
            job_id = int(env.get("SLURM_JOB_ID", "0"))
            env["MASTER_PORT"] = str(20000 + job_id % 20000)


def resolve_device(device: str = "auto") -> str:
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but CUDA is not available on this machine")
    return device


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron-core's tensor-parallel RNG tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # megatron-core (4-5 s to import) is imported inside these functions, so that importing
    # megatron_apriel.runtime (runtime.log, the launcher helpers) stays light
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        model_parallel_cuda_manual_seed(seed)


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    vpp: int | None = None,
    device: str = "auto",
    seed: int | None = 1234,
    timeout_minutes: float = 30,
) -> DistEnv:
    """Start torch.distributed and megatron-core's parallel groups (idempotent per process).

    ``timeout_minutes``: how long a collective may wait before torch gives up (training derives it
    from the ``fault.*_timeout`` budgets, so its own watchdog, which names the culprit, fires first)."""
    from megatron.core import parallel_state

    device = resolve_device(device)
    if device == "cpu":
        cpu_backend.activate(force=torch.cuda.is_available())

    launcher, rank, world, local_rank = detect_launcher()
    model_parallel = tp * pp * cp
    if min(tp, pp, cp) < 1:
        raise ValueError(f"parallel sizes must be >= 1, got tp={tp} pp={pp} cp={cp}")
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}"
        )
    if vpp is not None and vpp > 1 and pp == 1:
        raise ValueError("virtual pipeline stages (vpp) need pipeline parallelism (pp > 1)")

    if not torch.distributed.is_initialized():
        _setup_rendezvous(launcher)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if launcher == "single":
            # A private rendezvous store, not MASTER_ADDR/PORT in os.environ: exported variables would
            # leak into child processes (benchmarks, torchrun launched from here) and collide. The
            # store binds port 0 itself: a port found free and bound later can be taken in between
            # (gloo's connections of another run on the machine take ephemeral ports).
            rendezvous = {"store": torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)}
        else:
            rendezvous = {"init_method": "env://"}
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=timeout,
            **rendezvous,
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if (vpp or 1) > 1 else None,
        context_parallel_size=cp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_minutes)),
    )
    if seed is not None:
        set_seed(seed)
    return DistEnv(rank, world, local_rank, device, launcher, tp=tp, pp=pp, cp=cp, vpp=vpp)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
