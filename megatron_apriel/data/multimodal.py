"""Image-text samples for training: the Dataset the training loop reads for the Pixtral / LLaVA model,
from the files :mod:`megatron_apriel.data.preprocess_multimodal` writes.

:class:`MultimodalDataset` returns SFTDataset-like items plus the sample's images and
:meth:`MultimodalDataset.collate` builds the micro-batch: ``tokens``, ``labels``, ``loss_mask``,
``position_ids`` [b, s]; ``pixel_values`` float32 [N, 3, H, W] (images in placeholder order, row 0
first, zero-padded to the batch's largest H, W, as ``PixtralImageProcessor`` pads) and
``image_sizes`` int64 [N, 2].
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from megatron_apriel.data.blends import check_bin_length
from megatron_apriel.data.multimodal_format import (
    IMAGES_KEY,
    MASK_KEY,
    REFS_KEY,
    TOKENS_KEY,
    ImageLayout,
    dataset_path,
    meta_path,
)
from megatron_apriel.data.packing import fill_row, plan_rows

logger = logging.getLogger(__name__)



def read_indexed(prefix: str, key: str):
    """The indexed dataset, or None when it holds no bytes (megatron-core cannot mmap an empty .bin)."""
    path = dataset_path(prefix, key)
    if not os.path.isfile(path + ".bin") or not os.path.isfile(path + ".idx"):
        raise FileNotFoundError(f"{path}.bin/.idx: missing (run apriel preprocess-multimodal)")
    if os.path.getsize(path + ".bin") == 0:
        return None
    ds = IndexedDataset(path)
    check_bin_length(path, ds, prefix)
    return ds


class MultimodalDataset(torch.utils.data.Dataset):
    """Image-text samples from ``preprocess-multimodal`` output, one or several per row of ``seq_length``.

    Items: ``tokens``, ``labels``, ``loss_mask`` (1 where ``labels[i]`` is a trained-on token),
    ``position_ids`` (restarting per sample), ``pixel_values`` (a list of normalised float32
    [3, h, w] tensors in placeholder order) and ``image_sizes`` (int64 [n, 2]); with ``pack=True``
    also ``cu_seqlens`` as in SFTDataset. Use :meth:`collate` as the DataLoader's collate_fn.
    Samples longer than ``seq_length + 1`` tokens are left out (an image cannot be cut) and counted
    in ``dropped_overlong``; preprocess with ``--seq-length`` to drop them earlier.
    """

    def __init__(self, prefix: str, seq_length: int, epochs: int = 1, seed: int = 0, pack: bool = False,
                 window: int = 20000, pad_token_id: int = 0, max_docs: Optional[int] = None):
        meta = meta_path(prefix)
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"{meta}: missing (run apriel preprocess-multimodal; it is written last)")
        with open(meta, encoding="utf-8") as f:
            self.layout = ImageLayout(**json.load(f)["layout"])
        self.tokens = read_indexed(prefix, TOKENS_KEY)
        self.masks = read_indexed(prefix, MASK_KEY)
        self.images = read_indexed(prefix, IMAGES_KEY)
        self.refs = read_indexed(prefix, REFS_KEY)
        if self.tokens is None:
            raise ValueError(f"{prefix}: no samples")
        n = len(self.tokens)
        if len(self.masks) != n or (self.refs is not None and len(self.refs) != n):
            raise ValueError(f"{prefix}: tokens, loss masks and image references have different sample counts")
        self.prefix = prefix
        self.seq_length = seq_length
        self.pad_token_id = pad_token_id
        self.pack = pack
        self._processor = None
        slots = self.tokens.sequence_lengths.astype(np.int64) - 1
        keep = np.flatnonzero(slots <= seq_length)
        self.dropped_overlong = n - len(keep)
        if self.dropped_overlong:
            logger.warning("%s: %d of %d samples are longer than seq_length %d + 1 and left out",
                           prefix, self.dropped_overlong, n, seq_length)
        self.slots = slots
        self.bins, self.max_docs = plan_rows(slots, seq_length, epochs, seed, pack, window, keep=keep,
                                             max_docs=max_docs)

    def __len__(self) -> int:
        return len(self.bins)

    def image_rows(self, doc: int) -> list[int]:
        if self.refs is None:
            return []
        return [int(r) for r in self.refs[doc]]

    def load_image(self, row: int) -> np.ndarray:
        """The stored (resized) image as uint8 HWC."""
        with Image.open(io.BytesIO(self.images[row].tobytes())) as im:
            return np.asarray(im.convert("RGB"))

    def _normalise(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        if not images:
            return []
        if self._processor is None:
            self._processor = self.layout.processor()
        out = self._processor(images, do_resize=False, do_pad=False, input_data_format="channels_last")
        return [torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in out["pixel_values"]]

    def __getitem__(self, idx: int) -> dict:
        docs = self.bins[idx]
        item = fill_row(((self.tokens[doc], self.masks[doc]) for doc in docs), self.seq_length, self.pad_token_id,
                        self.max_docs, with_cu_seqlens=self.pack)
        images = [self.load_image(r) for doc in docs for r in self.image_rows(doc)]
        item["pixel_values"] = self._normalise(images)
        item["image_sizes"] = torch.tensor([im.shape[:2] for im in images], dtype=torch.int64).reshape(-1, 2)
        if self.pack:  # last, as the batch contract lists it
            item["cu_seqlens"] = item.pop("cu_seqlens")
        return item

    @staticmethod
    def collate(items: Sequence[dict]) -> dict:
        """Stack the [s] tensors to [b, s]; the images of all rows, in order, padded to one [N, 3, H, W]."""
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k not in ("pixel_values", "image_sizes")}
        images = [im for it in items for im in it.get("pixel_values", [])]
        sizes = [it["image_sizes"] for it in items if "image_sizes" in it]
        batch["image_sizes"] = torch.cat(sizes) if sizes else torch.zeros(0, 2, dtype=torch.int64)
        if not images:
            batch["pixel_values"] = torch.zeros(0, 3, 0, 0, dtype=torch.float32)
            return batch
        h = max(im.shape[1] for im in images)
        w = max(im.shape[2] for im in images)
        pixels = torch.zeros(len(images), 3, h, w, dtype=torch.float32)
        for i, im in enumerate(images):
            pixels[i, :, : im.shape[1], : im.shape[2]] = im
        batch["pixel_values"] = pixels
        return batch
