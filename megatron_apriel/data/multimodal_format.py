"""The files of an image-text dataset, shared by its writer and its readers.

``apriel preprocess-multimodal`` (:mod:`megatron_apriel.data.preprocess_multimodal`) writes, for a
prefix ``P``, four megatron-core indexed datasets ``P_<key>_document.bin/.idx`` (``KEYS``) and
``P_multimodal.json`` (the :class:`ImageLayout` and the counts); :mod:`megatron_apriel.data.multimodal`
and :mod:`megatron_apriel.data.image_text_blend` read them.
"""

from __future__ import annotations

from megatron_apriel.models.presets import ImageLayout  # noqa: F401 (the format's layout; defined with the presets)

TOKENS_KEY = "tokens"
MASK_KEY = "loss_mask"
IMAGES_KEY = "images"
REFS_KEY = "image_refs"
KEYS = (TOKENS_KEY, MASK_KEY, IMAGES_KEY, REFS_KEY)
PLACEHOLDER = "<image>"


def dataset_path(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def meta_path(prefix: str) -> str:
    return f"{prefix}_multimodal.json"
