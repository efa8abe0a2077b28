"""Rank-0 logging and progress bars: one copy for every module that reports from one rank only.

Under torchrun every rank runs the same code; these keep a converter or a tool from printing a line
(or drawing a bar) once per process. Outside torch.distributed the process is rank 0.
"""

from __future__ import annotations

import sys

import torch


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def log0(msg: str) -> None:
    """Print ``msg`` (flushed, to stdout) on rank 0 only."""
    if is_rank0():
        print(msg, flush=True)


def progress(total: int, desc: str, unit: str = "tensor"):
    """A tqdm bar on stderr, drawn on rank 0 only (tqdm is imported here: only long tools need it)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not is_rank0(), file=sys.stderr)
