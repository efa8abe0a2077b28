"""Sequence packing for SFT: bin planning, packed sample layout and megatron-core PackedSeqParams.

megatron-core supplies the packed-sequence *execution* (``PackedSeqParams`` with ``qkv_format="thd"``:
rotary restarted per document from ``cu_seqlens``, attention cut at document boundaries by the
core attention) but no planner that decides which documents share a row, so that part is written
here. The planner is best-fit decreasing over a shuffled window: documents are shuffled with the
epoch's seed, cut into windows of ``window`` documents, and inside each window placed longest first
into the fullest open bin that still has room (a sorted list of free capacities searched with
``bisect``, O(n log n)). Shuffling before the window keeps batches mixed across the dataset;
sorting inside it gives near-optimal fill (>= 98% on log-normal SFT lengths, see
benchmarks/packing.py), where greedy in-order concatenation leaves 10-30% padding.

Layout of a packed sample of ``seq_length`` slots (what :class:`~megatron_apriel.data.sft.SFTDataset`
returns): each document of ``n`` tokens contributes its ``n - 1`` (input, next-token label) pairs,
so no label ever crosses a document boundary; the free tail is one padding "document" with
``loss_mask`` 0. ``position_ids`` restart at 0 per document. ``cu_seqlens`` is an int32 tensor of a
fixed length ``max_docs + 2`` holding the cumulative boundaries ``[0, l1, l1+l2, ..., seq_length]``
followed by ``-1`` fill (fixed length so the default collate can stack samples).
"""

from __future__ import annotations

import bisect
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams


def plan_bins(lengths: Sequence[int], capacity: int, seed: int = 0, window: int = 20000,
              shuffle: bool = True) -> list[list[int]]:
    """Group document indices into bins whose length sum is <= ``capacity``.

    Returns bins of indices into ``lengths`` (longest first inside each bin); bins are in a random
    order. A document longer than ``capacity`` is an error: truncate or drop it before planning.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > capacity:
        i = int(lengths.argmax())
        raise ValueError(f"document {i} has {int(lengths[i])} slots > capacity {capacity}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    bins: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        free: list[tuple[int, int]] = []  # sorted (free capacity, bin id) of this window's bins
        for doc in chunk.tolist():
            n = int(lengths[doc])
            pos = bisect.bisect_left(free, (n, -1))
            if pos < len(free):
                cap, b = free.pop(pos)
            else:
                cap, b = capacity, len(bins)
                bins.append([])
            bins[b].append(doc)
            if cap - n > 0:
                bisect.insort(free, (cap - n, b))
    if shuffle:
        perm = rng.permutation(len(bins))
        bins = [bins[i] for i in perm]
    return bins


def packing_efficiency(lengths: Sequence[int], bins: list[list[int]], capacity: int) -> float:
    """Real slots / allocated slots."""
    used = sum(int(lengths[i]) for b in bins for i in b)
    return used / max(1, len(bins) * capacity)


def cu_seqlens_from_lengths(doc_lengths: Sequence[int], seq_length: int, max_docs: int) -> np.ndarray:
    """Boundaries ``[0, l1, ..., seq_length]`` (padding tail as a last document) filled with -1."""
    if len(doc_lengths) > max_docs:
        raise ValueError(f"{len(doc_lengths)} documents in one sample > max_docs {max_docs}")
    bounds = np.concatenate([[0], np.cumsum(doc_lengths, dtype=np.int64)])
    if bounds[-1] > seq_length:
        raise ValueError(f"documents fill {bounds[-1]} slots > seq_length {seq_length}")
    if bounds[-1] < seq_length:
        bounds = np.concatenate([bounds, [seq_length]])
    out = np.full(max_docs + 2, -1, dtype=np.int32)
    out[: len(bounds)] = bounds
    return out


def packed_seq_params_from_batch(batch: dict):
    """megatron-core ``PackedSeqParams`` (THD) for a collated packed batch.

    ``batch["cu_seqlens"]`` is [b, k] int32 with -1 fill (see the module docstring). Rows are laid
    end to end, so for ``b > 1`` the boundaries of row r are shifted by ``r * s``: the model must
    then see the batch flattened to [1, b * s] (megatron-core's THD path takes micro-batch 1); use
    :func:`flatten_packed_batch`, which does both.
    """
    cu = batch["cu_seqlens"]
    cu = torch.as_tensor(cu)
    if cu.dim() == 1:
        cu = cu.unsqueeze(0)
    s = int(torch.as_tensor(batch["tokens"]).shape[-1])
    pieces = []
    for r in range(cu.shape[0]):
        row = cu[r][cu[r] >= 0].to(torch.int64)
        if row.numel() < 2 or int(row[0]) != 0 or int(row[-1]) != s:
            raise ValueError(f"cu_seqlens row {r} must start at 0 and end at {s}, got {row.tolist()}")
        pieces.append(row[(1 if r else 0):] + r * s)
    cu_all = torch.cat(pieces).to(torch.int32)
    device = torch.as_tensor(batch["tokens"]).device
    cu_all = cu_all.to(device)
    max_len = int((cu_all[1:] - cu_all[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_all,
        cu_seqlens_kv=cu_all,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def flatten_packed_batch(batch: dict) -> dict:
    """[b, s] packed batch -> [1, b*s] tensors plus ``packed_seq_params`` (what GPTModel's THD path takes)."""
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        t = torch.as_tensor(batch[key])
        out[key] = t.reshape(1, -1)
    out["packed_seq_params"] = packed_seq_params_from_batch(batch)
    return out


def plan_rows(slots: np.ndarray, seq_length: int, epochs: int, seed: int, pack: bool, window: int = 20000,
              keep: Optional[np.ndarray] = None, max_docs: Optional[int] = None) -> tuple[list[list[int]], int]:
    """(rows, max_docs) of the SFT and multimodal datasets: the documents of each row of ``seq_length``.

    ``epochs`` plans are concatenated, each with its own shuffle (``seed + epoch``): packed with
    :func:`plan_bins` over the ``slots`` of the documents ``keep`` (default: all), or one document
    a row. ``max_docs`` (the length of ``cu_seqlens``) defaults to the fullest row's documents.
    """
    keep = np.arange(len(slots)) if keep is None else keep
    rows: list[list[int]] = []
    for epoch in range(epochs):
        if pack:
            bins = plan_bins(slots[keep], seq_length, seed=seed + epoch, window=window)
            rows += [[int(keep[i]) for i in b] for b in bins]
        else:
            rows += [[int(keep[i])] for i in np.random.default_rng(seed + epoch).permutation(len(keep))]
    needed = max((len(r) for r in rows), default=1)
    max_docs = needed if max_docs is None else max_docs
    if needed > max_docs:
        raise ValueError(f"a packed sample holds {needed} documents > max_docs {max_docs}")
    return rows, max_docs


def fill_row(docs: Iterable[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_token_id: int, max_docs: int,
             with_cu_seqlens: bool = True) -> dict:
    """One packed sample (the layout of the module docstring) from its documents' (tokens, loss mask),
    each of ``n + 1`` tokens for ``n`` slots; the tail is padding without loss."""
    s = seq_length
    tokens = np.full(s, pad_token_id, dtype=np.int64)
    labels = np.full(s, pad_token_id, dtype=np.int64)
    loss_mask = np.zeros(s, dtype=np.float32)
    position_ids = np.zeros(s, dtype=np.int64)
    lengths = []
    pos = 0
    for toks, mask in docs:
        toks = np.asarray(toks, dtype=np.int64)
        mask = np.asarray(mask, dtype=np.float32)
        n = len(toks) - 1
        tokens[pos : pos + n] = toks[:-1]
        labels[pos : pos + n] = toks[1:]
        loss_mask[pos : pos + n] = mask[1:]
        position_ids[pos : pos + n] = np.arange(n)
        lengths.append(n)
        pos += n
    position_ids[pos:] = np.arange(s - pos)
    item = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
    }
    if with_cu_seqlens:
        item["cu_seqlens"] = torch.from_numpy(cu_seqlens_from_lengths(lengths, s, max_docs))
    return item
