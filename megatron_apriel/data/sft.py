"""SFT data for training: the packed torch Dataset over what ``apriel preprocess-sft``
(:mod:`megatron_apriel.data.preprocess_sft`) writes.

:class:`SFTDataset` packs documents into rows of ``seq_length`` with :func:`~megatron_apriel.data.packing.plan_bins`
and returns GPTDataset-like items plus ``cu_seqlens`` for per-document attention.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_apriel.data.blends import check_bin_length
from megatron_apriel.data.packing import fill_row, packing_efficiency, plan_rows

TOKENS_KEY = "tokens"
MASK_KEY = "loss_mask"


def dataset_paths(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"



class SFTDataset(torch.utils.data.Dataset):
    """Packed SFT samples from ``preprocess-sft`` output.

    Items (length ``seq_length`` each): ``tokens``, ``labels`` (int64), ``loss_mask`` (float32;
    1 where ``labels[i]`` is an assistant token), ``position_ids`` (restarting per document) and
    ``cu_seqlens`` (int32, ``max_docs + 2`` entries, -1 filled; see megatron_apriel.data.packing).
    Hand a collated batch to ``packing.flatten_packed_batch`` for per-document attention. With
    ``pack=False`` every sample holds one document (same item layout).

    ``epochs`` plans are concatenated, each with its own shuffle (seed + epoch). Documents longer
    than ``seq_length + 1`` tokens are truncated (preprocess with ``--seq-length`` to control it).
    """

    def __init__(self, prefix: str, seq_length: int, epochs: int = 1, seed: int = 0, pack: bool = True,
                 window: int = 20000, pad_token_id: int = 0, max_docs: Optional[int] = None):
        self.tokens = IndexedDataset(dataset_paths(prefix, TOKENS_KEY))
        self.masks = IndexedDataset(dataset_paths(prefix, MASK_KEY))
        for key, ds in ((TOKENS_KEY, self.tokens), (MASK_KEY, self.masks)):
            check_bin_length(dataset_paths(prefix, key), ds, prefix)
        if len(self.tokens) != len(self.masks):
            raise ValueError(f"{prefix}: {len(self.tokens)} token documents but {len(self.masks)} masks")
        self.seq_length = seq_length
        self.pad_token_id = pad_token_id
        # A document of n tokens gives n - 1 (input, label) slots.
        self.slots = np.minimum(self.tokens.sequence_lengths.astype(np.int64) - 1, seq_length)
        self.bins, self.max_docs = plan_rows(self.slots, seq_length, epochs, seed, pack, window, max_docs=max_docs)

    @property
    def efficiency(self) -> float:
        return packing_efficiency(self.slots, self.bins, self.seq_length)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, idx: int) -> dict:
        docs = ((self.tokens.get(doc, 0, int(self.slots[doc]) + 1), self.masks.get(doc, 0, int(self.slots[doc]) + 1))
                for doc in self.bins[idx])
        return fill_row(docs, self.seq_length, self.pad_token_id, self.max_docs)
