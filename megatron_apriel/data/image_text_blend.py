"""The text + image-text blend of CPT stage 1 (50% text / 30% multimodal / 20% replay).

Registered as ``image-text-blend`` (:mod:`megatron_apriel.data.registry`); its spec is read by
:func:`megatron_apriel.data.blends.blend_spec`, as the training loop and the mix report read it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
import torch
from megatron.core.datasets import helpers

from megatron_apriel.config import ConfigError
from megatron_apriel.data.blends import (
    SourceSpec,
    blend_spec,
    blend_weights,
    build_datasets,
    prefix_stats,
    resolve_stage,
    train_samples_for,
)
from megatron_apriel.data.multimodal import MultimodalDataset, read_indexed
from megatron_apriel.data.multimodal_format import TOKENS_KEY, meta_path
from megatron_apriel.data.packing import cu_seqlens_from_lengths

logger = logging.getLogger(__name__)

KEY = "data.factory_args.blend"  # how errors name the spec



def _prefix_stats(prefix: str, key: str) -> tuple[int, int]:
    """(tokens, samples) of one blend prefix: a preprocess-multimodal prefix or a text indexed dataset."""
    if not is_multimodal(prefix):
        if not os.path.isfile(prefix + ".bin"):
            raise ConfigError(f"{key}: {prefix}: neither {meta_path(prefix)} (preprocess-multimodal) "
                              f"nor {prefix}.bin/.idx")
        return prefix_stats(prefix, key)
    try:
        ds = read_indexed(prefix, TOKENS_KEY)
    except (FileNotFoundError, ValueError) as e:  # _multimodal.json present, its tokens dataset not
        raise ConfigError(f"{key}: {e}") from None
    return (0, 0) if ds is None else (int(ds.sequence_lengths.sum(dtype=np.int64)), len(ds))


def is_multimodal(prefix: str) -> bool:
    """A prefix is image-text when ``apriel preprocess-multimodal`` wrote its ``_multimodal.json``."""
    return os.path.isfile(meta_path(prefix))


class ImageTextBlend(torch.utils.data.Dataset):
    """A blend spec whose prefixes are text indexed datasets or ``preprocess-multimodal`` outputs.

    ``data.kind: dataset`` with ``factory: image-text-blend`` and
    ``factory_args: {blend: <spec YAML or mapping>, global_batch_size: N}``. The spec is the one of
    :mod:`megatron_apriel.data.blends` (sources, weights, stages, budget, seed, split); a prefix is
    multimodal when ``<prefix>_multimodal.json`` exists. Weights flatten to one per prefix exactly as
    in ``blends.blend_weights`` (source share x token share inside the source). Why two levels:
    megatron-core's ``BlendedDataset`` blends ``GPTDataset`` children only, so all text prefixes form
    one megatron-core BlendedDataset (its own shuffling, epochs, split and cache) and that and each
    :class:`MultimodalDataset` are interleaved with megatron-core's ``build_blending_indices``, the
    greedy minimum-error order BlendedDataset itself uses, so every source stays within a sample or
    two of its share at any point. Items follow the multimodal batch contract (text rows carry no
    images) and are packed (``cu_seqlens``) when ``pack`` is set; multimodal prefixes are read in full
    (the spec's ``split`` applies to the text prefixes) and repeated in new shuffles as needed.
    """

    def __init__(self, blend, seq_length: int, global_batch_size: Optional[int] = None,
                 num_samples: Optional[int] = None, eod_token: int = 2, pack: bool = True, pad_token_id: int = 0,
                 key: str = KEY):
        # ``key``: how errors name the spec (the mix report of a blend file names keys from its top level)
        spec = resolve_stage(blend_spec(blend, seq_length, key=key))
        if num_samples is None:
            if global_batch_size is None:
                raise ConfigError("data.factory_args: give global_batch_size (or num_samples) to size the blend")
            num_samples = train_samples_for(spec, global_batch_size)
        # the blend's one flattening of the two-level weights; which prefixes are multimodal
        flat = [(i.source, i.prefix, is_multimodal(i.prefix), i.weight)
                for i in blend_weights(spec, stats=_prefix_stats, key=key)]
        self.prefixes = [(f[0], f[1]) for f in flat]  # (source, prefix) in spec order, drawn ones only
        self.prefix_weights = [f[3] for f in flat]  # share of the whole blend
        text = [f for f in flat if not f[2]]
        mm = [f for f in flat if f[2]]
        # row in self.prefixes of each text child dataset / of each child
        self._text_rows = np.asarray([k for k, f in enumerate(flat) if not f[2]], dtype=np.int64)
        self._child_rows = ([-1] if text else []) + [k for k, f in enumerate(flat) if f[2]]
        child_w = ([sum(f[3] for f in text)] if text else []) + [f[3] for f in mm]
        self.child_sources = ([[f[0] for f in text]] if text else []) + [[f[0]] for f in mm]
        self.child_names = (["text"] if text else []) + [f[1] for f in mm]
        weights = np.asarray(child_w, dtype=np.float64) / sum(child_w)
        self.dataset_index = np.zeros(num_samples, dtype=np.int16)
        self.dataset_sample_index = np.zeros(num_samples, dtype=np.int64)
        helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index, weights, len(weights),
                                       num_samples, False)
        counts = np.bincount(self.dataset_index, minlength=len(weights))
        self.children: list = []
        if text:
            by_source: dict = {}
            for name, p, _, w in text:
                by_source.setdefault(name, []).append((p, w))
            text_spec = dataclasses.replace(spec, sources=[
                SourceSpec(name, [p for p, _ in items], weight=sum(w for _, w in items),
                           prefix_weights=[w for _, w in items])
                for name, items in by_source.items()], stages=[], stage=None, tokens=None, steps=None)
            train, _ = build_datasets(text_spec, global_batch_size or 1, train_samples=int(counts[0]),
                                      eod_token=eod_token)
            self.children.append(train)
        for k, (_, p, _, _) in enumerate(mm):
            need = int(counts[len(self.children)])
            key = self._prefix_key(spec, p)
            try:
                ds = MultimodalDataset(p, seq_length, epochs=1, seed=spec.seed, pack=pack, pad_token_id=pad_token_id)
                epochs = max(1, -(-need // max(len(ds), 1)))
                if epochs > spec.repeat_warning:
                    logger.warning("%s is read %d times in this blend (repeat_warning %s)", p, epochs,
                                   spec.repeat_warning)
                if epochs > 1:
                    ds = MultimodalDataset(p, seq_length, epochs=epochs, seed=spec.seed, pack=pack,
                                           pad_token_id=pad_token_id)
            except (FileNotFoundError, ValueError) as e:  # a missing or inconsistent part of the prefix
                raise ConfigError(f"{key}: {e}") from None
            self.children.append(ds)
        self.has_text = bool(text)
        self.pack = pack
        self.seq_length = seq_length
        self.max_docs = max([c.max_docs for c in self.children if isinstance(c, MultimodalDataset)] + [1])
        for c in self.children:
            if isinstance(c, MultimodalDataset):
                c.max_docs = self.max_docs  # one cu_seqlens length for every row of a batch
        self.spec = spec

    @staticmethod
    def _prefix_key(spec, prefix: str) -> str:
        for i, s in enumerate(spec.sources):
            if prefix in s.prefixes:
                return f"data.factory_args.blend.sources[{i}].prefixes[{s.prefixes.index(prefix)}]"
        return prefix

    def __len__(self) -> int:
        return len(self.dataset_index)

    def prefix_counts(self, n: Optional[int] = None) -> np.ndarray:
        """Samples drawn from each of ``self.prefixes`` among the first ``n`` samples (default: all).

        A multimodal prefix is a child of its own; the text prefixes' draws are read from the text
        child's megatron-core blending index at the text samples' positions.
        """
        n = len(self) if not n else min(n, len(self))
        idx = self.dataset_index[:n]
        out = np.zeros(len(self.prefixes), dtype=np.int64)
        for c, count in enumerate(np.bincount(idx, minlength=len(self.children))):
            if self.has_text and c == 0:
                text = self.children[0]
                sample_ids = self.dataset_sample_index[:n][idx == 0]
                # one text prefix: megatron-core returns its GPTDataset itself, without blending indices
                blended = hasattr(text, "dataset_index")
                drawn = text.dataset_index[sample_ids] if blended else np.zeros(len(sample_ids), int)
                out[self._text_rows] += np.bincount(drawn, minlength=len(self._text_rows))
            else:
                out[self._child_rows[c]] += int(count)
        return out

    def source_shares(self, n: Optional[int] = None) -> dict:
        """Share of each source among the first ``n`` samples (text children split by their prefix draws)."""
        out: dict = {}
        for (source, _), count in zip(self.prefixes, self.prefix_counts(n)):
            out[source] = out.get(source, 0) + int(count)
        total = sum(out.values())
        return {k: v / total for k, v in out.items()}

    def __getitem__(self, idx: int) -> dict:
        c, j = int(self.dataset_index[idx]), int(self.dataset_sample_index[idx])
        item = self.children[c][j]
        if isinstance(self.children[c], MultimodalDataset):
            return item
        s = self.seq_length
        out = {k: item[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
        out["pixel_values"] = []
        out["image_sizes"] = torch.zeros(0, 2, dtype=torch.int64)
        if self.pack:
            out["cu_seqlens"] = torch.from_numpy(cu_seqlens_from_lengths([s], s, self.max_docs))
        return out

    collate = staticmethod(MultimodalDataset.collate)
