"""From a dataset to the micro-batches of each step: the sampler, the DataLoader and the batch mover.

The training loop asks :class:`Batches` for the ``n`` micro-batches of one global batch; they come
from a ``DataLoader`` over :class:`PretrainingSampler` (this data-parallel rank's share, in dataset
order from ``consumed_samples``), moved to the device, packed rows flattened for megatron-core's
THD path and, with context parallelism, cut to this CP rank's sequence chunks.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_apriel.data.packing import flatten_packed_batch

IMAGE_KEYS = ("pixel_values", "image_sizes")  # the multimodal batch (models/llava.py)
TEXT_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class PretrainingSampler:
    """Megatron-LM's MegatronPretrainingSampler (megatron/training, not in megatron-core).

    Yields this DP rank's indices of each micro-batch, in dataset order from ``consumed_samples``:
    a resumed run reads exactly the samples an uninterrupted run would have read next.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self):
        return self.total

    def __iter__(self):
        group = self.mbs * self.dp_size
        start = self.dp_rank * self.mbs
        for first in range(self.consumed, self.total - group + 1, group):
            yield list(range(first + start, first + start + self.mbs))


class Batches:
    """Micro-batches of one global batch from a DataLoader, moved to the device (packed ones flattened)."""

    def __init__(self, loader, device: str, cp: int = 1):
        self.it = iter(loader)
        self.device = device
        self.cp = cp

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            batch = next(self.it)
            if "cu_seqlens" in batch:
                # Flattening rows keeps the images' order (row 0 first), so they travel unchanged.
                batch = {**flatten_packed_batch(batch), **{k: batch[k] for k in IMAGE_KEYS if k in batch}}
            item = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                    for k, v in batch.items() if k in TEXT_KEYS + IMAGE_KEYS}
            if batch.get("packed_seq_params") is not None:
                p = batch["packed_seq_params"]
                for f in ("cu_seqlens_q", "cu_seqlens_kv"):
                    setattr(p, f, getattr(p, f).to(self.device))
                item["packed_seq_params"] = p
            elif self.cp > 1:  # this CP rank's two sequence chunks (load-balanced causal split)
                item = get_batch_on_this_cp_rank(item)
            out.append(item)
        return out


def make_loader(dataset, consumed: int, mbs: int, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over this DP rank's share of ``dataset`` from ``consumed`` samples on."""
    sampler = PretrainingSampler(len(dataset), consumed, mbs, ps.get_data_parallel_rank(),
                                 ps.get_data_parallel_world_size())
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False,
                                       collate_fn=getattr(dataset, "collate", None))


def batches(dataset, consumed: int, mbs: int, num_workers: int, device: str, cp: int = 1) -> Batches:
    """:class:`Batches` of ``dataset`` for this rank from ``consumed`` samples on."""
    return Batches(make_loader(dataset, consumed, mbs, num_workers), device, cp)
