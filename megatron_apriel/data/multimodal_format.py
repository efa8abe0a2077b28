"""The files of an image-text dataset, shared by its writer and its readers.

``apriel preprocess-multimodal`` (:mod:`megatron_apriel.data.preprocess_multimodal`) writes, for a
prefix ``P``, four megatron-core indexed datasets ``P_<key>_document.bin/.idx`` (``KEYS``) and
``P_multimodal.json`` (the :class:`ImageLayout` and the counts); :mod:`megatron_apriel.data.multimodal`
and :mod:`megatron_apriel.data.image_text_blend` read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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


@dataclass
class ImageLayout:
    """How images become pixels and tokens (Pixtral-12B's values by default)."""

    patch_size: int = 16
    image_size: int = 1024  # longest edge after resize
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    @property
    def token_ids(self) -> set[int]:
        return {self.image_token_id, self.image_break_token_id, self.image_end_token_id}

    def image_tokens(self, height: int, width: int) -> np.ndarray:
        """The tokens of one resized image (PixtralProcessor.replace_image_token, as ids)."""
        rows, cols = height // self.patch_size, width // self.patch_size
        grid = np.full((rows, cols + 1), self.image_token_id, dtype=np.int64)
        grid[:, -1] = self.image_break_token_id
        out = grid.reshape(-1)
        out[-1] = self.image_end_token_id
        return out

    def processor(self):
        """transformers' PixtralImageProcessor with these settings (PIL backend when torchvision is absent)."""
        try:  # transformers imported here: reading the dataset format needs no image processor
            from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil as cls
        except ImportError:  # older transformers: the slow processor is the PIL one
            from transformers import PixtralImageProcessor as cls
        return cls(size={"longest_edge": self.image_size}, patch_size=self.patch_size,
                   image_mean=list(self.image_mean), image_std=list(self.image_std))
