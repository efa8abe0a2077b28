"""The curriculum blend: a YAML spec of named sources turned into megatron-core datasets.

A stage of the recipe reads a weighted mix of sources (Apriel-Nemotron CPT: 60% reasoning traces,
25% chain-of-thought samples, 15% replay). Each source is a list of indexed-dataset prefixes,
weighted inside the source by their token counts unless ``prefix_weights`` are given. Sampling,
shuffling, epochs and the on-disk index cache are megatron-core's: ``GPTDatasetConfig`` +
``BlendedMegatronDatasetBuilder`` build one ``GPTDataset`` per prefix and one ``BlendedDataset``
over them, exactly as ``--data-path w1 p1 w2 p2 ...`` does in Megatron-LM.

Why the two levels are flattened: megatron-core's ``BlendedDataset`` blends ``MegatronDataset``
children of one type and cannot nest, so the two-level spec becomes one blend whose prefix weight
is ``source share x prefix share inside the source``. That is the same distribution, and the
blending indices (greedy, minimum error at every sample) keep each prefix, hence each source,
within a few samples of its target at any point of the stage.

Why the cache lives in a data-fingerprinted folder: megatron-core keys its index files by a hash of
the dataset description (path, split, seed, sequence length, sample count...), so a changed spec
already gets new files, but rewritten data under the same prefix would silently reuse stale
indices. ``cache_dir/<fingerprint>/`` (size and mtime of every .bin/.idx) rebuilds them then.

Resume: the order is a function of the spec and the data only (seed), so a run that consumed k
samples rebuilds the same dataset and continues at index k.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_apriel.config import ConfigError, from_dict, load_yaml

logger = logging.getLogger(__name__)


@dataclass
class SourceSpec:
    """One named source of the blend."""

    name: str
    prefixes: list[str]  # indexed-dataset path prefixes (without .bin/.idx)
    weight: float | None = None  # share of the stage; normalised over sources
    prefix_weights: list[float] | None = None  # default: by token count of each prefix


@dataclass
class StageSpec:
    """One stage of a staged curriculum: a new run from the averaged checkpoint of the previous."""

    name: str
    weights: dict[str, float] = field(default_factory=dict)  # source name -> weight (others: own)
    tokens: float | None = None
    steps: int | None = None
    load: str | None = None  # starting checkpoint of the stage
    seed: int | None = None


@dataclass
class BlendSpec:
    """The ``data.blend`` section of a training YAML (or a blend file of its own).

    Errors name keys under where the spec was read (``from_dict``'s ``where``): ``data.blend.<key>``
    in a training config, ``<key>`` in a blend file of its own.
    """

    sources: list[SourceSpec]
    seq_length: int
    seed: int = 1234
    split: str = "99,1,0"  # Megatron-LM style train/valid/test split (documents of each prefix)
    tokens: float | None = None  # token budget of the stage (e.g. 68e9) ...
    steps: int | None = None  # ... or a step count (times the global batch size)
    cache_dir: str | None = None  # index cache; None: megatron-core's default beside the data
    stages: list[StageSpec] = field(default_factory=list)
    stage: str | None = None  # the stage this run trains (its weights, budget, load)
    repeat_warning: float = 4.0  # warn when a source's tokens are seen more times than this
    eod_mask_loss: bool = False  # GPTDataset options, as in Megatron-LM
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    mid_level_dataset_surplus: float = 0.005
    num_dataset_builder_threads: int = 1

    def validate(self, where: str = "data.blend") -> None:
        at = f"{where}." if where else ""
        if not self.sources:
            raise ConfigError(f"{at}sources: give at least one source")
        names: set[str] = set()
        seen_prefixes: dict[str, str] = {}
        given = [s.weight is not None for s in self.sources]
        for i, s in enumerate(self.sources):
            key = f"{at}sources[{i}]"
            if not s.name:
                raise ConfigError(f"{key}.name: empty source name")
            if s.name in names:
                raise ConfigError(f"{key}.name: duplicate source name {s.name!r}")
            names.add(s.name)
            if not s.prefixes:
                raise ConfigError(f"{key}.prefixes: source {s.name!r} has no data prefixes")
            for j, p in enumerate(s.prefixes):
                if p.endswith((".bin", ".idx")):
                    raise ConfigError(f"{key}.prefixes[{j}]: give the prefix without .bin/.idx: {p!r}")
                if p in seen_prefixes:
                    raise ConfigError(
                        f"{key}.prefixes[{j}]: {p!r} is already in source {seen_prefixes[p]!r}"
                    )
                seen_prefixes[p] = s.name
            if s.weight is not None:
                _check_positive(s.weight, f"{key}.weight")
            elif any(given):
                raise ConfigError(f"{key}.weight: missing (give every source a weight, or none)")
            if s.prefix_weights is not None:
                if len(s.prefix_weights) != len(s.prefixes):
                    raise ConfigError(
                        f"{key}.prefix_weights: {len(s.prefix_weights)} weights for "
                        f"{len(s.prefixes)} prefixes"
                    )
                for j, w in enumerate(s.prefix_weights):
                    _check_positive(w, f"{key}.prefix_weights[{j}]")
        if self.seq_length <= 0:
            raise ConfigError(f"{at}seq_length: must be positive, got {self.seq_length}")
        parse_split(self.split, f"{at}split")
        _check_budget(self.tokens, self.steps, at)
        if self.repeat_warning <= 0:
            raise ConfigError(f"{at}repeat_warning: must be positive, got {self.repeat_warning}")
        stage_names: set[str] = set()
        for i, st in enumerate(self.stages):
            key = f"{at}stages[{i}]"
            if not st.name or st.name in stage_names:
                raise ConfigError(f"{key}.name: missing or duplicate stage name {st.name!r}")
            stage_names.add(st.name)
            for src, w in st.weights.items():
                if src not in names:
                    raise ConfigError(f"{key}.weights.{src}: no source named {src!r} (sources: {sorted(names)})")
                _check_positive(w, f"{key}.weights.{src}")
            if st.weights and not all(given) and set(st.weights) != names:
                raise ConfigError(f"{key}.weights: sources have no weights, so give all of them here")
            _check_budget(st.tokens, st.steps, f"{key}.")
        if self.stage is not None and self.stage not in stage_names:
            raise ConfigError(f"{at}stage: no stage named {self.stage!r} (stages: {sorted(stage_names)})")


def _check_positive(value: float, key: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}: a weight must be a positive number, got {value!r}")


def _check_budget(tokens, steps, at: str) -> None:
    """``at``: the section's key prefix (``data.blend.``, ``data.blend.stages[0].``, or empty)."""
    if tokens is not None and steps is not None:
        raise ConfigError(f"{at}tokens / {at}steps: give the budget as tokens or steps, not both")
    if tokens is not None and not tokens > 0:
        raise ConfigError(f"{at}tokens: must be positive, got {tokens}")
    if steps is not None and not steps > 0:
        raise ConfigError(f"{at}steps: must be positive, got {steps}")


def parse_split(split: str, key: str = "data.blend.split") -> list[float]:
    """``"99,1,0"`` -> normalised [train, valid, test] (megatron-core's own parser, checked first)."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{key}: expected numbers like '99,1,0', got {split!r}") from None
    if len(values) > 3 or any(v < 0 for v in values) or not values or values[0] <= 0:
        raise ConfigError(f"{key}: expected up to 3 non-negative numbers with train > 0, got {split!r}")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def resolve_stage(spec: BlendSpec, stage: str | None = None) -> BlendSpec:
    """The spec of one stage: the stage's weights, budget and seed replace the top-level ones."""
    stage = stage if stage is not None else spec.stage
    if stage is None:
        return spec
    matches = [st for st in spec.stages if st.name == stage]
    if not matches:
        raise ConfigError(f"data.blend.stage: no stage named {stage!r} (stages: {[s.name for s in spec.stages]})")
    st = matches[0]
    sources = [
        dataclasses.replace(s, weight=st.weights.get(s.name, s.weight)) for s in spec.sources
    ]
    budget = {"tokens": st.tokens, "steps": st.steps} if (st.tokens or st.steps) else {}
    return dataclasses.replace(
        spec,
        sources=sources,
        seed=st.seed if st.seed is not None else spec.seed,
        stage=stage,
        **budget,
    )


def blend_spec(blend, seq_length: int | None, train_iters: int | None = None, key: str = "data.blend") -> BlendSpec:
    """The one way from a training config's blend to its :class:`BlendSpec`.

    ``blend`` is the spec inline (a mapping) or the path of its YAML; ``key`` names it in errors
    (``data.blend`` for ``data.kind: blend``, ``data.factory_args.blend`` for the image-text
    blend). The blend's ``seq_length`` defaults to the training's and must equal it; with
    ``train_iters`` (training, the mix report of a training config), a blend that gives no budget
    of its own runs ``train.train_iters`` steps. The training loop, the image-text blend and the
    mix report all read a config's blend through here, so they cannot disagree on it.
    """
    if isinstance(blend, (str, os.PathLike)):
        raw = load_yaml(blend)
    elif isinstance(blend, dict):
        raw = dict(blend)
    else:
        raise ConfigError(f"{key}: expected a mapping or a YAML path, got {blend!r}")
    if seq_length is not None:
        raw.setdefault("seq_length", seq_length)
    if train_iters is not None and raw.get("tokens") is None and raw.get("steps") is None:
        raw["steps"] = max(train_iters, 1)  # no budget given: train.train_iters
    spec = from_dict(BlendSpec, raw, key)
    if seq_length is not None and spec.seq_length != seq_length:
        raise ConfigError(f"{key}.seq_length {spec.seq_length} != train.seq_length {seq_length}")
    return spec


def stage_checkpoint(spec: BlendSpec) -> str | None:
    """The starting checkpoint of the selected stage (None without stages)."""
    for st in spec.stages:
        if st.name == spec.stage:
            return st.load
    return None


def train_samples_for(spec: BlendSpec, global_batch_size: int) -> int:
    """Samples of the stage: the token budget in whole steps (rounded up), or steps x batch."""
    spec = resolve_stage(spec)
    if global_batch_size <= 0:
        raise ConfigError(f"global batch size must be positive, got {global_batch_size}")
    if spec.steps is not None:
        return int(spec.steps) * global_batch_size
    if spec.tokens is None:
        raise ConfigError("data.blend.tokens / data.blend.steps: give the budget of the stage")
    samples = math.ceil(spec.tokens / spec.seq_length)
    return math.ceil(samples / global_batch_size) * global_batch_size


# ----------------------------------------------------------------------------------------------
# data checks and weights


@dataclass
class PrefixInfo:
    source: str
    prefix: str
    tokens: int  # all documents of the prefix
    documents: int
    weight: float  # share of the whole blend


def check_bin_length(prefix: str, ds, key: str) -> None:
    """The ``.bin`` holds every byte its ``.idx`` points at. A partial copy (the ``.idx`` arrived whole,
    the ``.bin`` not) would otherwise pass every check and stop training partway with megatron-core's
    ``offset must be non-negative``, naming no file."""
    index = ds.index
    if not len(index.sequence_lengths):
        return
    need = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    have = os.path.getsize(prefix + ".bin")
    if have < need:
        raise ConfigError(f"{key}: {prefix}.bin is {have:,} bytes but its .idx needs {need:,} "
                          "(truncated copy? copy the .bin again)")


def prefix_stats(prefix: str, key: str) -> tuple[int, int]:
    """(tokens, documents) of a text indexed-dataset prefix; ``key`` names it in errors."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise ConfigError(f"{key}: missing file {prefix + ext}")
    if os.path.getsize(prefix + ".bin") == 0:  # no documents (and megatron-core cannot mmap it)
        return 0, 0
    try:
        ds = IndexedDataset(prefix, multimodal=False, mmap=True)
    except Exception as e:  # a truncated or foreign .idx
        raise ConfigError(f"{key}: cannot read {prefix}.idx as an indexed dataset ({e})") from None
    check_bin_length(prefix, ds, key)
    tokens = int(ds.sequence_lengths.sum(dtype=numpy.int64))
    return tokens, int(len(ds.sequence_lengths))


def blend_weights(spec: BlendSpec, stats=prefix_stats, key: str = "data.blend") -> list[PrefixInfo]:
    """Check the data of every prefix and flatten the two-level weights (see module docstring).

    The one place weights are flattened: the image-text blend passes its own ``stats(prefix, key)``
    -> (tokens, documents), which also reads image-text prefixes, and its ``key``.
    """
    spec = resolve_stage(spec)
    at = f"{key}." if key else ""  # a blend file of its own: keys from its top level
    per_source = []
    for i, s in enumerate(spec.sources):
        per = [stats(p, f"{at}sources[{i}].prefixes[{j}]") for j, p in enumerate(s.prefixes)]
        if sum(t for t, _ in per) == 0:
            raise ConfigError(f"{at}sources[{i}]: source {s.name!r} has no tokens in {s.prefixes}")
        for j, (t, _) in enumerate(per):
            if t == 0 and (s.prefix_weights is not None):
                raise ConfigError(f"{at}sources[{i}].prefixes[{j}]: {s.prefixes[j]} has no tokens")
        per_source.append(per)
    source_w = [s.weight if s.weight is not None else sum(t for t, _ in per)
                for s, per in zip(spec.sources, per_source)]
    total_w = float(sum(source_w))
    out = []
    for s, per, sw in zip(spec.sources, per_source, source_w):
        inner = s.prefix_weights if s.prefix_weights is not None else [t for t, _ in per]
        inner_total = float(sum(inner))
        for p, (t, d), w in zip(s.prefixes, per, inner):
            if w == 0 or t == 0:  # an empty prefix weighted by its (zero) tokens: nothing to draw
                logger.warning("prefix %s of source %s has no tokens; it is left out", p, s.name)
                continue
            out.append(PrefixInfo(s.name, p, t, d, sw / total_w * w / inner_total))
    return out


def data_fingerprint(prefixes: list[str]) -> str:
    h = hashlib.sha256()
    for p in prefixes:
        for ext in (".bin", ".idx"):
            st = os.stat(p + ext)
            h.update(f"{os.path.abspath(p)}{ext}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class _SpecialTokens:
    """What GPTDataset needs from a tokenizer: the end-of-document id (no pad: -1 is used)."""

    def __init__(self, eod: int):
        self.eod = eod
        self.vocab_size = None

    @property
    def unique_identifiers(self):  # keeps the config printable / hashable by megatron-core
        return {"eod": self.eod}


def gpt_dataset_config(spec: BlendSpec, infos: list[PrefixInfo], eod_token: int):
    cache = None
    if spec.cache_dir:
        cache = os.path.join(spec.cache_dir, "data-" + data_fingerprint([i.prefix for i in infos]))
    return GPTDatasetConfig(
        random_seed=spec.seed,
        sequence_length=spec.seq_length,
        blend=([i.prefix for i in infos], [i.weight for i in infos]),
        split=",".join(str(v) for v in parse_split(spec.split)),
        path_to_cache=cache,
        tokenizer=_SpecialTokens(eod_token),
        reset_position_ids=spec.reset_position_ids,
        reset_attention_mask=spec.reset_attention_mask,
        eod_mask_loss=spec.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=spec.mid_level_dataset_surplus,
        num_dataset_builder_threads=spec.num_dataset_builder_threads,
    )


@contextlib.contextmanager
def _process_group():
    """A one-process gloo world when none exists (the report, tests): megatron-core's
    BlendedDataset asks torch.distributed for the rank whenever it caches its indices."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def build_datasets(
    spec: BlendSpec,
    global_batch_size: int,
    train_samples: int | None = None,
    valid_samples: int = 0,
    eod_token: int = 0,
    is_built_on_rank=None,
):
    """megatron-core ``BlendedDataset`` (train, and valid or None) over the blend of ``spec``.

    Items are megatron-core's GPTDataset dicts: 'tokens', 'labels', 'loss_mask', 'position_ids'
    (length seq_length), plus 'dataset_id' (the prefix index in ``blend_weights(spec)``) that
    BlendedDataset adds. ``is_built_on_rank`` as in Megatron-LM (default: every rank builds;
    rank 0 first, the others then read its cache).
    """
    spec = resolve_stage(spec)
    if train_samples is None:
        train_samples = train_samples_for(spec, global_batch_size)
    fractions = parse_split(spec.split)
    if valid_samples > 0 and fractions[1] == 0:
        raise ConfigError(f"data.blend.split: {spec.split!r} leaves no validation documents for {valid_samples} "
                          "valid samples")
    infos = blend_weights(spec)
    config = gpt_dataset_config(spec, infos, eod_token)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset,
        [train_samples, valid_samples, 0],
        is_built_on_rank or (lambda: True),
        config,
    )
    with _process_group():
        train, valid, _ = builder.build()
    if valid_samples == 0:
        valid = None
    return train, valid
