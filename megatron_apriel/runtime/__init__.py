"""Process setup: distributed init from torchrun/SLURM/single process, seeds, the CPU backend."""

from megatron_apriel.runtime.distributed import (
    DistEnv,
    destroy_distributed,
    detect_launcher,
    expand_slurm_nodelist,
    init_distributed,
    resolve_device,
    set_seed,
)

__all__ = [
    "DistEnv",
    "destroy_distributed",
    "detect_launcher",
    "expand_slurm_nodelist",
    "init_distributed",
    "resolve_device",
    "set_seed",
]
