"""The datasets a training config names by ``data.factory``.

A registered name (``synthetic``, ``sft``, ``multimodal``, ...) or, for a user's own dataset, a
``module:callable`` string. The table holds import paths rather than the classes so that naming a
dataset imports only its module (the multimodal ones pull in PIL and transformers' image
processor). Code that must know *which* dataset a config names (the mix report reads an
image-text blend differently) compares the resolved callable, never the spelling.
"""

from __future__ import annotations

import importlib
from typing import Callable

from megatron_apriel.config import ConfigError

DATASETS = {
    "synthetic": "megatron_apriel.data.synthetic:SyntheticDataset",
    "synthetic-image-text": "megatron_apriel.data.synthetic:SyntheticImageTextDataset",
    "sft": "megatron_apriel.data.sft:SFTDataset",
    "multimodal": "megatron_apriel.data.multimodal:MultimodalDataset",
    "image-text-blend": "megatron_apriel.data.image_text_blend:ImageTextBlend",
}
# module:callable spellings of configs written before a dataset had a module of its own
MOVED = {"megatron_apriel.data.multimodal:ImageTextBlend": "image-text-blend"}


def check_dataset_name(factory: str, key: str = "data.factory") -> None:
    """A config error unless ``factory`` is a registered name or a ``module:callable`` string."""
    if factory not in DATASETS and ":" not in factory:
        raise ConfigError(f"{key}: unknown dataset {factory!r}; registered: {', '.join(DATASETS)} "
                          f"(or give module:callable for a dataset of your own)")


def resolve_dataset(factory: str, key: str = "data.factory") -> Callable:
    """The callable of a registered name or a ``module:callable`` string."""
    check_dataset_name(factory, key)
    factory = MOVED.get(factory, factory)
    module, _, name = DATASETS.get(factory, factory).partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {factory!r}: {e}") from None
