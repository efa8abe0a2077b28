"""Datasets without files, for the tiny example configs, smoke tests and the multimodal path's tests.

Registered as ``synthetic`` and ``synthetic-image-text`` (:mod:`megatron_apriel.data.registry`).
"""

from __future__ import annotations

import torch

from megatron_apriel.models import get_preset


class SyntheticDataset(torch.utils.data.Dataset):
    """A learnable corpus without files, for the tiny example configs and smoke tests.

    Sample i is an arithmetic progression modulo ``vocab`` (start and stride drawn from ``seed`` and
    i): the next token follows from the previous two, so a tiny model's loss falls within steps.
    """

    def __init__(self, seq_length: int, num_samples: int = 4096, vocab: int = 500, seed: int = 0,
                 max_stride: int = 7, masked_fraction: float = 0.0):
        self.s, self.n, self.vocab, self.seed = seq_length, num_samples, vocab, seed
        self.max_stride, self.masked_fraction = max_stride, masked_fraction

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, self.vocab, (1,), generator=g))
        stride = int(torch.randint(1, self.max_stride + 1, (1,), generator=g))
        seq = (start + stride * torch.arange(self.s + 1)) % self.vocab
        mask = torch.ones(self.s)
        if self.masked_fraction:  # a prompt-like prefix without loss, as in SFT
            mask[: int(self.s * self.masked_fraction)] = 0
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": mask, "position_ids": torch.arange(self.s)}


class SyntheticImageTextDataset(torch.utils.data.Dataset):
    """Image-caption samples without files, for the tiny multimodal configs and tests.

    Each image is a flat colour (class c of ``classes``, plus noise) of a size drawn from ``sizes``;
    its caption token is ``caption_base + c``, so only the image tells the model what comes next.
    Placeholders are laid out as PixtralProcessor writes them; the rest of the row is the arithmetic
    progression of :class:`SyntheticDataset`. ``loss_on_text=False`` trains on the captions only
    (response-only loss, as in CPT stage 2). Items and :meth:`collate` follow the batch contract of
    :mod:`megatron_apriel.models.llava`.
    """

    def __init__(self, seq_length: int, num_samples: int = 1024, seed: int = 0, preset: str = "tiny-llava",
                 sizes=((8, 8), (8, 12), (12, 8)), images_per_sample: int = 1, classes: int = 8,
                 caption_base: int = 100, vocab: int = 500, loss_on_text: bool = True):
        self.s, self.n, self.seed = seq_length, num_samples, seed
        self.vision = get_preset(preset).vision
        self.sizes, self.k, self.classes = [tuple(x) for x in sizes], images_per_sample, classes
        self.caption_base, self.vocab, self.loss_on_text = caption_base, vocab, loss_on_text

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> dict:
        v, g = self.vision, torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        seq, trained, pixels, sizes = [1], [False], [], []
        for _ in range(self.k):
            h, w = self.sizes[int(torch.randint(0, len(self.sizes), (1,), generator=g))]
            c = int(torch.randint(0, self.classes, (1,), generator=g))
            pixels.append(torch.full((3, h, w), 2.0 * c / self.classes - 1.0) + 0.1 * torch.randn(3, h, w, generator=g))
            sizes.append((h, w))
            for r in range(h // v.patch_size):
                seq += [v.image_token_id] * (w // v.patch_size)
                seq.append(v.image_end_token_id if r == h // v.patch_size - 1 else v.image_break_token_id)
            trained += [False] * (len(seq) - len(trained))
            seq.append(self.caption_base + c)
            trained.append(True)
        if len(seq) > self.s:
            raise ValueError(f"seq_length {self.s} is too short for {self.k} image(s) of up to {max(sizes)} pixels")
        start = int(torch.randint(0, self.vocab, (1,), generator=g))
        stride = int(torch.randint(1, 8, (1,), generator=g))
        rest = self.s + 1 - len(seq)
        # Text stays clear of the control and image ids (< 20) that the image placeholders use.
        seq += (20 + (start + stride * torch.arange(rest)) % (self.vocab - 20)).tolist()
        trained += [self.loss_on_text] * rest
        seq = torch.tensor(seq)
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": torch.tensor(trained[1:], dtype=torch.float32),
                "position_ids": torch.arange(self.s), "pixel_values": pixels,
                "image_sizes": torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)}

    @staticmethod
    def collate(items) -> dict:
        """[b, s] text tensors; every row's images in order, zero-padded to one [N, 3, H, W]."""
        batch = {k: torch.stack([it[k] for it in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        images = [im for it in items for im in it["pixel_values"]]
        batch["image_sizes"] = torch.cat([it["image_sizes"] for it in items])
        h, w = max((im.shape[1] for im in images), default=0), max((im.shape[2] for im in images), default=0)
        batch["pixel_values"] = torch.zeros(len(images), 3, h, w)
        for j, im in enumerate(images):
            batch["pixel_values"][j, :, : im.shape[1], : im.shape[2]] = im
        return batch
