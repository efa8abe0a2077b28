"""``model.fp8``: which backend and recipe runs the GEMMs in float8, and whether it can run here.

``te-hybrid`` / ``te-e4m3`` hand the flag to Transformer Engine (its spec and kernels; a GPU with TE
installed). ``torchao-tensorwise`` / ``torchao-rowwise`` keep megatron-core's local spec and compute
the linears of attention and MLP in float8 through torchao (:mod:`megatron_apriel.models.float8_linear`);
on the CPU backend those GEMMs are emulated, so the tests run the same path. Light on purpose (torch
only): the training config validates the key at load time.
"""

from __future__ import annotations

from typing import Optional

import torch

TE_RECIPES = {"te-hybrid": "hybrid", "te-e4m3": "e4m3"}
TORCHAO_RECIPES = {"torchao-tensorwise": "tensorwise", "torchao-rowwise": "rowwise"}
CHOICES = ("none", *TE_RECIPES, *TORCHAO_RECIPES)
# What earlier configs wrote (the TE format names alone): the same runs as before.
LEGACY = {"hybrid": "te-hybrid", "e4m3": "te-e4m3"}


def normalize(value) -> str:
    """The ``model.fp8`` value as one of :data:`CHOICES` (``None``/``false``/legacy names accepted)."""
    if value is None or value is False:
        return "none"
    if isinstance(value, str) and value in LEGACY:
        return LEGACY[value]
    if not isinstance(value, str) or value not in CHOICES:
        raise ValueError(f"must be one of {', '.join(CHOICES)}; got {value!r}")
    return value


def te_format(value) -> Optional[str]:
    """The TE ``fp8`` format of a TE recipe, else None (torchao and none pass nothing to TE)."""
    return TE_RECIPES.get(normalize(value))


def torchao_recipe(value) -> Optional[str]:
    """``tensorwise`` / ``rowwise`` for a torchao recipe, else None."""
    return TORCHAO_RECIPES.get(normalize(value))


def check(value, device: str, te_available: bool) -> str:
    """Refuse, before any work, an ``model.fp8`` that cannot run here; returns the normalized value.

    Raises ValueError with the reason (the caller names the key)."""
    fp8 = normalize(value)
    if fp8 == "none":
        return fp8
    if fp8 in TE_RECIPES:
        if device != "cuda":
            raise ValueError(f"{fp8} needs Transformer Engine on a CUDA GPU; this run is on the CPU "
                             f"(torchao-tensorwise runs emulated on the CPU)")
        if not te_available:
            raise ValueError(f"{fp8} needs Transformer Engine (pip install -e '.[gpu]'), which is not installed; "
                             f"torchao-tensorwise needs no TE")
    else:
        try:
            import torchao.float8  # noqa: F401
        except Exception as e:
            raise ValueError(f"{fp8} needs torchao (pip install torchao): {e}") from None
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise ValueError(f"{fp8} needs CUDA compute capability >= 8.9 (Ada, Hopper or newer); this GPU is "
                             f"{major}.{minor}")
    return fp8
