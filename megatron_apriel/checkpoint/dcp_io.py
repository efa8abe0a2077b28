"""Reading and writing megatron-core distributed checkpoints without building a model.

Everything of the checkpoint layer that touches a dist checkpoint on disk lives here, so that the
converters, the averaging tool and the training loop share one copy and depend on it one way:

* the iteration folders of a training save root (``iter_0000100/``, the
  ``latest_checkpointed_iteration.txt`` marker) and :func:`resolve_load_dir`;
* the model description written beside a checkpoint (``apriel_model.yaml``: the preset and dtype);
* :class:`DistCheckpointReader`, which reads any row range of a stored tensor through torch DCP
  with :class:`SlicePlanner` (megatron-core's own load must cover a tensor's full extent, which in
  one process means allocating every layer);
* :class:`LazyBlockSavePlanner`, which writes a dist checkpoint whose blocks are computed only when
  the writer asks for them (averaging streams through it).

Canonical names (see :mod:`megatron_apriel.checkpoint.mistral`) are read here too: megatron-core
stacks the layers of a ``*.layers.{i}.*`` tensor along a first axis under ``*.layers.*`` and stores
the local spec's norms under Transformer Engine's fused names (:data:`TE_NORM_KEYS`), so
:meth:`DistCheckpointReader.get` returns one layer's full tensor by its canonical name, whatever
TP/PP saved it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed.checkpoint as dcp
import yaml  # deferred like every YAML use: only writers of a checkpoint need it
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.default_planner import create_default_local_save_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_apriel.errors import InputError
from megatron_apriel.models.presets import ModelPreset, VisionPreset

MODEL_META = "apriel_model.yaml"
TRACKER = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
# Entries of a training checkpoint that are not model weights.
NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "rerun_state")
# Canonical (local spec) layer suffix -> the suffix megatron-core stores it under: Transformer
# Engine fuses these norms into the next linear layer, and TE and local runs share checkpoints.
TE_NORM_KEYS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.+\.)?layers\.)(?P<layer>\d+)\.(?P<suffix>.+)$")


class ConversionError(InputError):
    """Bad input to a conversion (missing/unknown tensors, wrong shapes, unreadable metadata)."""


def limited(names: Iterable[str], n: int = 20) -> str:
    """At most ``n`` of ``names``, sorted, for an error message."""
    names = sorted(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- iteration folders
def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest(root: Optional[str]) -> Optional[int]:
    """The iteration named by the marker, or None (no marker, or it names a missing folder)."""
    if not root:
        return None
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, got {text!r}")
    it = int(text)
    if not os.path.isdir(iter_dir(root, it)):
        raise ValueError(f"{path} names iteration {it} but {iter_dir(root, it)} does not exist")
    return it


def list_iterations(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_RE.match, os.listdir(root)) if m)


def resolve_load_dir(path: str) -> tuple[str, Optional[int]]:
    """``path`` is a save root (use its marker) or one ``iter_*`` folder / bare dist checkpoint."""
    if os.path.isfile(os.path.join(path, TRACKER)):
        it = read_latest(path)
        return iter_dir(path, it), it
    if os.path.isfile(os.path.join(path, "metadata.json")):
        m = _ITER_RE.match(os.path.basename(os.path.normpath(path)))
        return path, int(m.group(1)) if m else None
    raise FileNotFoundError(f"{path}: neither a checkpoint folder with {TRACKER} nor a distributed checkpoint")


# --------------------------------------------------------------------------- model description
def write_model_meta(folder: str | os.PathLike, preset: ModelPreset, dtype: torch.dtype, **extra) -> None:
    fields = dataclasses.asdict(preset)
    if fields.get("vision") is None:
        fields.pop("vision", None)
    body = {"preset": fields, "dtype": dtype_name(dtype), **extra}
    Path(folder, MODEL_META).write_text(yaml.safe_dump(body, sort_keys=False))


def find_model_meta(ckpt_dir: str | os.PathLike) -> Optional[Path]:
    """The ``apriel_model.yaml`` describing a checkpoint: beside it, or in its save root; else None."""
    for folder in (Path(ckpt_dir), Path(ckpt_dir).parent):
        if (folder / MODEL_META).is_file():
            return folder / MODEL_META
    return None


def read_model_meta(ckpt_dir: str | os.PathLike) -> tuple[ModelPreset, Optional[str]]:
    """The preset (and saved dtype) written beside a converted checkpoint, or in its save root."""
    path = find_model_meta(ckpt_dir)
    if path is None:
        raise ConversionError(f"{ckpt_dir}: no {MODEL_META} here or in its parent; pass --preset NAME")
    body = yaml.safe_load(path.read_text())
    try:
        fields = dict(body["preset"])
        if fields.get("vision"):
            fields["vision"] = VisionPreset(**fields["vision"])
        return ModelPreset(**fields), body.get("dtype")
    except (KeyError, TypeError) as e:
        raise ConversionError(f"{path}: not a model description ({e})") from None


# --------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Global shape and dtype of one tensor of a dist checkpoint."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    row_starts: tuple[int, ...] = (0,)  # first-axis offsets where stored chunks begin


def stored_key(name: str) -> tuple[str, Optional[int]]:
    """(key in a dist checkpoint, layer index into its stacked first axis or None) of a canonical name."""
    m = _LAYER_NAME.match(name)
    if m is None:
        return name, None
    suffix = m["suffix"]
    return m["prefix"] + TE_NORM_KEYS.get(suffix, suffix), int(m["layer"])


class DistCheckpointReader:
    """Model tensors of a megatron-core dist checkpoint, read a slice at a time without a model.

    The one reader of dist checkpoints for conversion and averaging. ``meta`` lists every stored
    model tensor (optimizer, RNG and rerun state left out) by its checkpoint key with its global
    shape; :meth:`read` returns any row range of one of them, whatever TP/PP saved it, reading only
    the stored chunks that overlap it. Non-tensor model entries (``_extra_state``) are listed in
    ``objects``. :meth:`get` reads by canonical name (global layer index, full TP-unsharded tensor),
    one layer in memory at a time. No process group is needed.
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        try:
            self.path = resolve_load_dir(str(ckpt_dir))[0]
        except FileNotFoundError:
            if not Path(ckpt_dir, ".metadata").is_file():  # a bare torch.distributed.checkpoint folder
                raise
            self.path = str(ckpt_dir)
        try:
            stored = dcp.FileSystemReader(self.path).read_metadata().state_dict_metadata
        except Exception as e:  # unreadable or not a dist checkpoint
            raise ConversionError(f"{self.path}: cannot read dist checkpoint metadata ({e})") from None
        model = {k: v for k, v in stored.items() if not k.startswith(NON_MODEL_PREFIXES)}
        self.meta = {k: StoredTensor(tuple(v.size), v.properties.dtype,
                                     tuple(sorted({c.offsets[0] for c in v.chunks} | {0})) if len(v.size) else (0,))
                     for k, v in model.items() if isinstance(v, TensorStorageMetadata)}
        self.objects = [k for k, v in model.items() if isinstance(v, BytesStorageMetadata)]
        self._cache: tuple[Optional[tuple[str, int]], dict[str, torch.Tensor]] = (None, {})

    # ------------------------------------------------------------------ checkpoint keys
    def read(self, key: str, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Rows ``start:stop`` (first axis) of stored tensor ``key``; the whole tensor by default."""
        return self._load({key: (key, start, stop)})[key]

    def row_starts(self, key: str) -> list[int]:
        """First-axis offsets where stored chunks of ``key`` begin: reading between two of them
        reads no stored byte twice."""
        return list(self.meta[key].row_starts)

    def read_objects(self) -> dict[str, io.BytesIO]:
        """The non-tensor model entries, as the serialized bytes torch DCP stored."""
        objects = {k: io.BytesIO() for k in self.objects}
        if objects:
            dcp.load(objects, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        return objects

    def _load(self, requests: dict[str, tuple[str, Optional[int], Optional[int]]]) -> dict[str, torch.Tensor]:
        """Read row ranges of stored tensors straight through torch DCP (out name -> (key, start, stop))."""
        state, chunks = {}, {}
        for name, (key, start, stop) in requests.items():
            if key not in self.meta:
                raise ConversionError(f"{self.path}: tensor {key!r} (for {name}) not in the checkpoint")
            m = self.meta[key]
            shape = tuple(m.global_shape)
            rows = shape[0] if shape else 0
            start, stop = (0 if start is None else start), (rows if stop is None else stop)
            if not shape or (start, stop) == (0, rows):
                state[name] = torch.empty(shape, dtype=m.dtype)
                chunks[name] = (key, None)
                continue
            if not 0 <= start < stop <= rows:
                raise ConversionError(f"{self.path}: rows {start}:{stop} of {key!r} outside its {rows} rows")
            state[name] = torch.empty((stop - start,) + shape[1:], dtype=m.dtype)
            chunks[name] = (key, ChunkStorageMetadata(offsets=torch.Size([start] + [0] * (len(shape) - 1)),
                                                      sizes=state[name].shape))
        dcp.load(state, storage_reader=dcp.FileSystemReader(self.path), planner=SlicePlanner(chunks), no_dist=True)
        return state

    # ------------------------------------------------------------------ canonical names
    stored_key = staticmethod(stored_key)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a canonical tensor, from the metadata alone."""
        key, layer = stored_key(name)
        if key not in self.meta:
            raise ConversionError(f"{self.path}: tensor {key!r} (for {name}) not in the checkpoint")
        m = self.meta[key]
        return (tuple(m.global_shape[1:]) if layer is not None else tuple(m.global_shape)), m.dtype

    def get(self, name: str) -> torch.Tensor:
        """The full tensor of a canonical name; a layer's tensors are read together and kept until
        another layer (or a non-layer tensor) is asked for."""
        key, layer = stored_key(name)
        if layer is None:
            self._cache = (None, {})  # the layers are done: do not hold one beside a vocabulary-sized tensor
            return self.read(key)
        prefix = _LAYER_NAME.match(name)["prefix"]
        if self._cache[0] != (prefix, layer):
            self._cache = (None, {})  # drop the previous layer before reading the next
            stacked = {k for k in self.meta if k.startswith(prefix) and _LAYER_NAME.match(k) is None}
            requests = {n: (k, i, i + 1) for n in _canonical_layer_names(prefix, layer, stacked)
                        for k, i in [stored_key(n)] if k in self.meta}
            self._cache = ((prefix, layer), {n: t[0] for n, t in self._load(requests).items()})
        if name not in self._cache[1]:
            raise ConversionError(f"{self.path}: tensor {key!r} (for {name}) not in the checkpoint")
        return self._cache[1][name]

    __getitem__ = get


def _canonical_layer_names(prefix: str, layer: int, stacked: Iterable[str]) -> list[str]:
    """Canonical names of layer ``layer`` for the stacked keys under ``prefix``."""
    to_canonical = {v: k for k, v in TE_NORM_KEYS.items()}
    return [f"{prefix}{layer}.{to_canonical.get(k[len(prefix):], k[len(prefix):])}" for k in sorted(stacked)]


def _slice_planner_class():
    # torch.distributed.checkpoint's planners are imported on first use: importing them costs a
    # second and most users of this module (the training loop's folder helpers) never plan a read.

    class _SlicePlanner(DefaultLoadPlanner):
        """Plans reads of given chunks (global offsets) of stored tensors into small local tensors.

        ``chunks`` maps each local name to (stored key, chunk or None for the whole tensor), so
        several slices of one stored tensor can be read in one call.
        """

        def __init__(self, chunks):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.chunks = chunks

        def create_local_plan(self) -> LoadPlan:
            items = []
            for name, tensor in self.state_dict.items():
                key, chunk = self.chunks[name]
                chunk = chunk or ChunkStorageMetadata(offsets=torch.Size([0] * tensor.dim()), sizes=tensor.shape)
                for item in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk]):
                    # read the stored key into the local tensor registered under ``name``
                    items.append(dataclasses.replace(item, dest_index=dataclasses.replace(item.dest_index, fqn=name)))
            return LoadPlan(items)

        def lookup_tensor(self, index):
            # Each local name maps to one tensor: the chunk it holds was fixed in create_local_plan.
            return self.state_dict[index.fqn]

    return _SlicePlanner


def SlicePlanner(chunks):
    """A torch DCP load planner reading ``chunks`` (local name -> (stored key, chunk or None))."""
    return _slice_planner_class()(chunks)


# --------------------------------------------------------------------------- writing
def LazyBlockSavePlanner(blocks: list[tuple[str, Optional[tuple[int, int]]]], shapes: dict, dtypes: dict,
                         compute: Callable[[str, Optional[tuple[int, int]]], torch.Tensor],
                         on_block: Callable[[], None] = lambda: None):
    """A torch DCP save planner whose tensor data is computed when written, one block alive at a time.

    ``blocks`` lists every (tensor name, row range or None for the whole tensor) of the output, of
    global shapes ``shapes`` and dtypes ``dtypes``; ``compute(name, rows)`` makes a block when the
    writer asks for it; ``on_block`` is called after each (a progress bar).
    """
    class _LazyBlockSavePlanner(DefaultSavePlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self._last = None

        def create_local_plan(self) -> SavePlan:
            items = list(create_default_local_save_plan(self.state_dict, self.is_coordinator).items)
            for name, rows in blocks:
                size = torch.Size(shapes[name])
                if rows is None:
                    offsets, sizes, kind = torch.Size([0] * len(size)), size, WriteItemType.TENSOR
                else:
                    offsets = torch.Size([rows[0]] + [0] * (len(size) - 1))
                    sizes, kind = torch.Size([rows[1] - rows[0], *size[1:]]), WriteItemType.SHARD
                items.append(WriteItem(index=MetadataIndex(name, offsets), type=kind, tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                    properties=TensorProperties(dtype=dtypes[name]), size=size)))
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            # The writer keeps a reference to every tensor it wrote (for its safetensors format),
            # so free the previous block's memory by hand: it has been written once we are asked
            # for the next one.
            if self._last is not None:
                self._last.untyped_storage().resize_(0)
            offsets, sizes = write_item.tensor_data.chunk.offsets, write_item.tensor_data.chunk.sizes
            rows = (offsets[0], offsets[0] + sizes[0]) if write_item.type == WriteItemType.SHARD else None
            self._last = compute(write_item.index.fqn, rows).contiguous()
            on_block()
            return self._last

    return _LazyBlockSavePlanner()
