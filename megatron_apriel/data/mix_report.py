"""The mix report of a blend: what it will draw from each source before a run spends GPUs on it
(the ``apriel mix-report`` verb, :mod:`megatron_apriel.training.mix_report`, reads the spec).

It builds the stage's indices exactly as training does (``blends.build_datasets``, so the cache is
shared with the run) and reads the realised mix from megatron-core's blending index
(``BlendedDataset.dataset_index``): per source and prefix, tokens available in the train split,
tokens drawn, epochs, realised share over the first N samples and over the whole stage. A source
drawn more than ``repeat_warning`` times is flagged. A PNG bar chart shows target vs realised.

A blend with image-text prefixes (``apriel preprocess-multimodal`` outputs, recognised by
``<prefix>_multimodal.json``; the Apriel-1.5 CPT stage-1 mix) is read by training as
``image_text_blend.ImageTextBlend``, so the report builds that instead (same spec, sequence length, global
batch size and seed; packing does not change which child a sample comes from) and reads the draws
from ``ImageTextBlend.prefix_counts``. For such a prefix, "tokens available" are the tokens of the
samples of its ``_tokens_document`` dataset that fit in ``seq_length + 1`` (the ones the blend can
draw; images included as their placeholder tokens, the whole dataset since the split applies to
text prefixes only), and "tokens drawn" is samples x seq_length as for text (a packed row is one
sample). Text prefixes of such a blend report their train split as in a text blend.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy

from megatron_apriel.config import atomic_path
from megatron_apriel.data.blends import (
    BlendSpec,
    blend_weights,
    build_datasets,
    resolve_stage,
    train_samples_for,
)
from megatron_apriel.data.image_text_blend import ImageTextBlend, is_multimodal
from megatron_apriel.data.multimodal import MultimodalDataset


@dataclass
class Row:
    source: str
    prefix: str  # "" on source rows
    target: float
    tokens_available: int  # documents of the train split
    tokens_drawn: int
    epochs: float
    share_first: float
    share_stage: float


@dataclass
class Report:
    stage: str | None
    seq_length: int
    train_samples: int
    first: int
    sources: list[Row]
    prefixes: list[Row]
    warnings: list[str]


def mix_report(spec: BlendSpec, global_batch_size: int = 1, first: int = 1000, stage: str | None = None,
               key: str = "data.blend") -> Report:
    """The report of ``spec``; ``key`` names the spec in errors (``data.blend`` in a training config,
    empty for a blend file of its own)."""
    spec = resolve_stage(spec, stage)
    n_stage = train_samples_for(spec, global_batch_size)
    if any(is_multimodal(p) for s in spec.sources for p in s.prefixes):
        return _image_text_report(spec, global_batch_size, first, n_stage, key)
    infos = blend_weights(spec, key=key)
    print(f"building the indices of {len(infos)} prefixes for {n_stage:,} samples "
          f"(cache: {spec.cache_dir or 'beside the data'}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    train, _ = build_datasets(spec, global_batch_size, train_samples=n_stage)
    print(f"indices ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    index = numpy.asarray(train.dataset_index[:n_stage])
    first = min(first, n_stage)
    count_first = numpy.bincount(index[:first], minlength=len(infos))
    count_stage = numpy.bincount(index, minlength=len(infos))

    prefixes = []
    for k, (info, ds) in enumerate(zip(infos, train.datasets)):
        available = int(ds.dataset.sequence_lengths[ds.indices].sum(dtype=numpy.int64))
        drawn = int(count_stage[k]) * spec.seq_length
        prefixes.append(
            Row(info.source, info.prefix, info.weight, available, drawn,
                drawn / available if available else float("inf"),
                count_first[k] / first, count_stage[k] / n_stage)
        )
    return _report(spec, n_stage, first, prefixes)


def _report(spec: BlendSpec, n_stage: int, first: int, prefixes: list[Row]) -> Report:
    """Source rows (sums of their prefix rows) and repeat warnings."""
    sources, warnings = [], []
    for s in spec.sources:
        rows = [r for r in prefixes if r.source == s.name]
        available = sum(r.tokens_available for r in rows)
        drawn = sum(r.tokens_drawn for r in rows)
        row = Row(s.name, "", sum(r.target for r in rows), available, drawn,
                  drawn / available if available else float("inf"),
                  sum(r.share_first for r in rows), sum(r.share_stage for r in rows))
        sources.append(row)
        if row.epochs > spec.repeat_warning:
            warnings.append(
                f"source {s.name!r} is seen {row.epochs:.2f} times (more than repeat_warning="
                f"{spec.repeat_warning:g}): {available:,} tokens available for {drawn:,} drawn"
            )
    return Report(spec.stage, spec.seq_length, n_stage, first, sources, prefixes, warnings)


def _image_text_report(spec: BlendSpec, global_batch_size: int, first: int, n_stage: int, key: str) -> Report:
    raw = dict(asdict(spec), stages=[], stage=None)  # already resolved: its weights, budget and seed
    print(f"building the image-text blend of {sum(len(s.prefixes) for s in spec.sources)} prefixes for "
          f"{n_stage:,} samples (text indices cache: {spec.cache_dir or 'beside the data'}) ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    blend = ImageTextBlend(raw, spec.seq_length, global_batch_size=global_batch_size, num_samples=n_stage, key=key)
    print(f"blend ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    first = min(first, n_stage)
    count_first, count_stage = blend.prefix_counts(first), blend.prefix_counts(n_stage)
    available = {}
    if blend.has_text:
        text = blend.children[0]
        for ds in getattr(text, "datasets", [text]):  # a GPTDataset, were megatron-core to return one unblended
            available[ds.dataset_path] = int(ds.dataset.sequence_lengths[ds.indices].sum(dtype=numpy.int64))
    for child in blend.children:
        if isinstance(child, MultimodalDataset):
            fits = child.slots <= spec.seq_length
            available[child.prefix] = int(child.tokens.sequence_lengths[fits].sum(dtype=numpy.int64))
    prefixes = []
    for k, ((source, prefix), weight) in enumerate(zip(blend.prefixes, blend.prefix_weights)):
        drawn = int(count_stage[k]) * spec.seq_length
        tokens = available[prefix]
        prefixes.append(Row(source, prefix, weight, tokens, drawn, drawn / tokens if tokens else float("inf"),
                            count_first[k] / first, count_stage[k] / n_stage))
    return _report(spec, n_stage, first, prefixes)


def format_report(r: Report) -> str:
    head = (f"{'source / prefix':<44} {'target':>7} {'first':>7} {'stage':>7} {'available':>16} {'drawn':>16} "
            f"{'epochs':>7}")
    lines = [
        f"stage {r.stage or '(single)'}: {r.train_samples:,} samples x {r.seq_length} tokens = "
        f"{r.train_samples * r.seq_length:,} tokens; 'first' = realised share over the first {r.first:,} samples",
        head,
        "-" * len(head),
    ]
    for s in r.sources:
        lines.append(_row_line(s.source, s))
        for p in r.prefixes:
            if p.source == s.source:
                name = "  " + (p.prefix if len(p.prefix) <= 40 else "..." + p.prefix[-37:])
                lines.append(_row_line(name, p))
    lines += [f"WARNING: {w}" for w in r.warnings]
    return "\n".join(lines)


def _row_line(name: str, row: Row) -> str:
    return (f"{name:<44} {100 * row.target:6.2f}% {100 * row.share_first:6.2f}% {100 * row.share_stage:6.2f}% "
            f"{row.tokens_available:>16,} {row.tokens_drawn:>16,} {row.epochs:7.2f}")


def write_png(r: Report, path: str) -> None:
    import matplotlib  # deferred: only the chart needs it, and it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.source for s in r.sources]
    x = numpy.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 4))
    bars = [("target", [s.target for s in r.sources]),
            (f"first {r.first:,} samples", [s.share_first for s in r.sources]),
            ("whole stage", [s.share_stage for s in r.sources])]
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        ax.bar(x + (i - 1) * width, [100 * v for v in values], width, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("share of tokens (%)")
    ax.set_title(f"blend{' stage ' + r.stage if r.stage else ''}: target vs realised token shares")
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(os.path.abspath(path), suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)

