"""Freezing named parameter groups before DDP wrapping.

Parameters with ``requires_grad=False`` are left out of megatron-core's DDP grad buffers and of the
optimizer's parameter groups, so a frozen group gets no gradient, no all-reduce, no Adam state and
stays bit-identical. The group -> parameter-name-prefix table is the only thing defined here.
"""

from __future__ import annotations

GROUP_PREFIXES = {
    "embeddings": ("embedding.",),
    "decoder": ("decoder.",),
    "output_layer": ("output_layer.",),
    # megatron-core LLaVAModel names
    "vision_encoder": ("vision_model.",),
    "projector": ("vision_projection.",),
}


def _strip(name: str) -> str:
    # LLaVAModel nests the GPT under language_model.
    return name[len("language_model."):] if name.startswith("language_model.") else name


def freeze_groups(chunks, groups) -> int:
    """Set requires_grad=False on the named groups of every chunk; returns the frozen element count."""
    unknown = [g for g in groups if g not in GROUP_PREFIXES]
    if unknown:
        raise ValueError(f"unknown freeze group {unknown[0]!r} (known: {', '.join(GROUP_PREFIXES)})")
    prefixes = tuple(p for g in groups for p in GROUP_PREFIXES[g])
    frozen = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            stripped = _strip(name)
            if prefixes and (stripped.startswith(prefixes) or name.startswith(prefixes)):
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen
