"""HF MistralForCausalLM <-> megatron-core distributed checkpoints, at any TP/PP, tensor by tensor.

``hf-to-mcore`` builds the GPTModel of the preset at the requested layout (no random init), copies
HF tensors into it one at a time from memory-mapped safetensors through the explicit table of
:mod:`megatron_apriel.checkpoint.mistral`, and saves ``{"model": model.sharded_state_dict()}`` with
``dist_checkpointing`` -- the same state the training loop saves and loads, so megatron-core
reshards it to any TP/PP. Beside it go ``apriel_model.yaml`` (the preset) and ``hf/`` (the source
config, generation config and tokenizer files) so the way back needs nothing else.

``mcore-to-hf`` never builds a model: :class:`McoreCheckpointReader` asks torch DCP for one
layer's slice of each stacked tensor at a time, and each HF tensor is written at its place in a
shard laid out up front (:class:`ShardedSafetensorsWriter` with a layout). Peak memory is one layer
plus the tensor being written, not a shard. The stored global tensors are already in canonical layout (TP
shards of qkv and of the gate/up halves of fc1 are placed by their global offsets), so reading is
independent of the TP/PP that saved the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from megatron_apriel.checkpoint import mistral
from megatron_apriel.checkpoint.hf_io import (
    SIDE_FILES,
    SafetensorsFileError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    copy_side_files,
    write_output_dir,
)
from megatron_apriel.models.presets import ModelPreset, get_preset

MODEL_META = "apriel_model.yaml"
HF_SIDE = "hf"  # sub-folder of a converted dist checkpoint holding the source HF side files
TOKENIZER_FILES = tuple(f for f in SIDE_FILES if f not in ("config.json", "generation_config.json"))
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

# Canonical per-layer suffix -> key suffix of the stacked tensor in a dist checkpoint. The local
# spec stores its norms under Transformer Engine's fused names so TE and local runs share checkpoints.
_STORED_LAYER_KEY = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
LAYER_SUFFIXES = tuple(mistral.LAYER_COPY) + tuple(mistral.LAYER_FUSED)


class ConversionError(ValueError):
    """Bad input to a conversion (missing/unknown tensors, wrong shapes, unreadable metadata)."""


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _log(msg: str) -> None:
    if _is_rank0():
        print(msg, flush=True)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not _is_rank0(), file=sys.stderr)


# --------------------------------------------------------------------------- preset metadata
def write_model_meta(folder: str | os.PathLike, preset: ModelPreset, dtype: torch.dtype, **extra) -> None:
    import yaml

    fields = dataclasses.asdict(preset)
    if fields.get("vision") is None:
        fields.pop("vision", None)
    body = {"preset": fields, "dtype": _dtype_name(dtype), **extra}
    Path(folder, MODEL_META).write_text(yaml.safe_dump(body, sort_keys=False))


def read_model_meta(ckpt_dir: str | os.PathLike) -> tuple[ModelPreset, Optional[str]]:
    """The preset (and saved dtype) written beside a converted checkpoint, or in its save root."""
    import yaml

    from megatron_apriel.models.presets import VisionPreset

    for folder in (Path(ckpt_dir), Path(ckpt_dir).parent):
        path = folder / MODEL_META
        if path.is_file():
            body = yaml.safe_load(path.read_text())
            try:
                fields = dict(body["preset"])
                if fields.get("vision"):
                    fields["vision"] = VisionPreset(**fields["vision"])
                return ModelPreset(**fields), body.get("dtype")
            except (KeyError, TypeError) as e:
                raise ConversionError(f"{path}: not a model description ({e})") from None
    raise ConversionError(f"{ckpt_dir}: no {MODEL_META} here or in its parent; pass --preset NAME")


def preset_from_hf_dir(hf_dir: str | os.PathLike) -> ModelPreset:
    """The preset of an HF folder's config.json; a field the model cannot compute is a ConversionError."""
    from megatron_apriel.models.hf_config import HFConfigError, check_hf_dir

    try:
        cfg, _ = check_hf_dir(hf_dir, report=_is_rank0())
        return ModelPreset.from_hf_config(cfg, name=Path(hf_dir).name)
    except HFConfigError as e:
        raise ConversionError(str(e)) from None


# --------------------------------------------------------------------------- HF side
def _hf_prefix(reader: SafetensorsReader) -> tuple[str, str]:
    """Decoder prefix and lm_head name: MistralForCausalLM, or the Llava/Pixtral on-disk layout."""
    if "model.embed_tokens.weight" in reader:
        return "model", "lm_head.weight"
    if "language_model.model.embed_tokens.weight" in reader:
        return "language_model.model", "language_model.lm_head.weight"
    if "model.language_model.embed_tokens.weight" in reader:
        return "model.language_model", "lm_head.weight"
    raise ConversionError(f"{reader.folder}: no embed_tokens tensor; not a Mistral-family checkpoint")


def _limited(names: Iterable[str], n: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


class HFCanonical:
    """Canonical megatron tensors computed on demand from an HF checkpoint (one at a time).

    A mapping for :func:`mistral.load_canonical_into_chunks`: it asks for one canonical tensor per
    parameter, so only that tensor (and its HF parts) is alive besides the model.
    """

    def __init__(self, reader: SafetensorsReader, preset: ModelPreset):
        self.reader, self.preset = reader, preset
        self.prefix, self.lm_head = _hf_prefix(reader)
        expected = set(mistral.hf_names(preset, self.prefix, self.lm_head))
        present = set(reader.keys())
        missing = expected - present
        if missing:
            raise ConversionError(f"{reader.folder}: tensors missing for {preset.num_layers} layers: {_limited(missing)}")
        unknown = {k for k in present - expected
                   if not k.endswith("rotary_emb.inv_freq") and not k.startswith(("vision_tower.", "multi_modal_projector.",
                                                                                  "model.vision_tower.", "model.multi_modal_projector."))}
        if unknown:
            raise ConversionError(f"{reader.folder}: tensors the Mistral table does not know: {_limited(unknown)}")
        self.hf_bytes = 0

    def _get(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        # Closing the file unmaps it once this tensor is freed: pages of tensors already copied
        # into the model would otherwise stay resident and count a second model in RSS.
        self.reader.close()
        self.hf_bytes += t.numel() * t.element_size()
        return t

    def __contains__(self, name: str) -> bool:
        try:
            self._parts(name)
            return True
        except KeyError:
            return False

    def _parts(self, name: str):
        glob = {"embedding.word_embeddings.weight": f"{self.prefix}.embed_tokens.weight",
                "decoder.final_layernorm.weight": f"{self.prefix}.norm.weight"}
        if self.preset.untie_embeddings:
            glob["output_layer.weight"] = self.lm_head
        if name in glob:
            return None, glob[name]
        if not name.startswith("decoder.layers."):
            raise KeyError(name)
        _, _, i, suffix = name.split(".", 3)
        hf = f"{self.prefix}.layers.{i}."
        if suffix in mistral.LAYER_COPY:
            return None, hf + mistral.LAYER_COPY[suffix]
        if suffix in mistral.LAYER_FUSED:
            return suffix, [hf + p for p in mistral.LAYER_FUSED[suffix]]
        raise KeyError(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        fused, parts = self._parts(name)
        if fused is None:
            return self._get(parts)
        tensors = [self._get(p) for p in parts]
        if fused == "self_attention.linear_qkv.weight":
            return mistral.pack_qkv(*tensors, self.preset)
        return torch.cat(tensors, dim=0)


def _safetensors_dtype(reader: SafetensorsReader, prefix: str) -> torch.dtype:
    st = reader.dtype(f"{prefix}.embed_tokens.weight")
    if st not in _ST_DTYPES:
        raise ConversionError(f"{reader.folder}: unsupported tensor dtype {st}")
    return _ST_DTYPES[st]


# --------------------------------------------------------------------------- HF -> mcore
def hf_to_mcore_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
                           dtype: Optional[str | torch.dtype] = None, tokenizer: Optional[str] = None,
                           force: bool = False) -> dict:
    """Write a megatron-core dist checkpoint of the HF model in ``hf_dir`` to ``out_dir``.

    Run in one process (TP=PP=1) or under torchrun with ``tp * pp`` processes (each rank loads only
    its shards). ``dtype`` defaults to the dtype of the HF tensors. Returns a summary dict.
    """
    from megatron.core import dist_checkpointing

    from megatron_apriel.models.builder import build_model_chunks
    from megatron_apriel.runtime import init_distributed

    from megatron_apriel.checkpoint import llava

    if llava.is_llava_hf_dir(hf_dir):  # Pixtral/LLaVA: the multimodal model and table
        return llava.hf_to_mcore_checkpoint(hf_dir, out_dir, tp=tp, pp=pp, dtype=dtype, tokenizer=tokenizer, force=force)
    start = time.time()
    preset = preset_from_hf_dir(hf_dir)
    reader = SafetensorsReader(hf_dir)
    canonical = HFCanonical(reader, preset)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    dtype = dtype or _safetensors_dtype(reader, canonical.prefix)
    if preset.num_attention_heads % tp or preset.num_query_groups % tp or preset.ffn_hidden_size % tp:
        raise ConversionError(f"tp={tp} does not divide heads/groups/ffn of {hf_dir}")
    if preset.num_layers % pp:
        raise ConversionError(f"pp={pp} does not divide num_layers={preset.num_layers}")
    out = Path(out_dir)
    if _is_rank0() and out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")

    init_distributed(tp=tp, pp=pp, device="cpu", seed=None)
    config = preset.transformer_config(tp=tp, pp=pp, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                       fp16=dtype == torch.float16, device="cpu", perform_initialization=False)
    chunks = build_model_chunks(preset, config)
    n_params = sum(1 for c in chunks for _ in c.parameters())
    bar = _progress(n_params, "hf-to-mcore")

    # load_canonical_into_chunks asks for each parameter once; count them for the progress bar.
    class _Tracked:
        def __contains__(self, name):
            return name in canonical

        def __getitem__(self, name):
            t = canonical[name]
            bar.update(1)
            return t

    with torch.no_grad():
        mistral.load_canonical_into_chunks(chunks, _Tracked(), preset)
    bar.close()
    reader.close()

    state = {"model": chunks[0].sharded_state_dict()}
    state["checkpoint_version"] = 3.0
    summary = {"tensors": n_params, "bytes": canonical.hf_bytes, "dtype": _dtype_name(dtype), "tp": tp, "pp": pp}

    def write(tmp: Path) -> None:
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

        dist_checkpointing.save(state, str(tmp), get_default_save_sharded_strategy("torch_dist"))
        if _is_rank0():
            write_model_meta(tmp, preset, dtype, source=str(Path(hf_dir).resolve()), saved_tp=tp, saved_pp=pp)
            side = tmp / HF_SIDE
            side.mkdir()
            copy_side_files(hf_dir, side)
            if tokenizer:
                _copy_tokenizer(tokenizer, side)

    write_output_dir(out, write, force=force)
    summary["seconds"] = round(time.time() - start, 2)
    _log(f"hf-to-mcore: {n_params} tensors per rank, {canonical.hf_bytes / 1e9:.3f} GB read, "
         f"{_dtype_name(dtype)}, tp={tp} pp={pp}, {summary['seconds']:.1f} s -> {out}")
    return summary


def _copy_tokenizer(src: str | os.PathLike, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            (dst / name).write_bytes(p.read_bytes())
            copied.append(name)
    if not copied:
        raise ConversionError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    return copied


# --------------------------------------------------------------------------- reading dist checkpoints
@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Global shape and dtype of one tensor of a dist checkpoint."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    row_starts: tuple[int, ...] = (0,)  # first-axis offsets where stored chunks begin


# Entries of a training checkpoint that are not model weights.
NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "rerun_state")


class McoreCheckpointReader:
    """Model tensors of a megatron-core dist checkpoint, read a slice at a time without a model.

    The one reader of dist checkpoints for conversion and averaging. ``meta`` lists every stored
    model tensor (optimizer, RNG and rerun state left out) by its checkpoint key with its global
    shape; :meth:`read` returns any row range of one of them, whatever TP/PP saved it, reading only
    the stored chunks that overlap it. Non-tensor model entries (``_extra_state``) are listed in
    ``objects``.

    For GPT checkpoints (``gpt=True``, this converter's or a training ``iter_*`` folder / save
    root) it also speaks canonical names (:mod:`mistral`): ``decoder.layers.{i}.<suffix>`` with
    global layer indices, full TP-unsharded tensors, one layer in memory at a time (:meth:`get`).
    Embedding and output rows are the padded vocabulary as stored (``mistral.mcore_to_hf`` drops
    the padding). No process group is needed.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, gpt: bool = True):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        from megatron_apriel.training.checkpointing import resolve_load_dir

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
        self.num_layers: Optional[int] = None
        if gpt:
            layer_keys = [k for k in self.meta if k.startswith("decoder.layers.")]
            if "embedding.word_embeddings.weight" not in self.meta or not layer_keys:
                raise ConversionError(f"{self.path}: no GPT model tensors (found {_limited(self.meta, 8)})")
            self.num_layers = self.meta[layer_keys[0]].global_shape[0]
        self._cache: tuple[Optional[int], dict[str, torch.Tensor]] = (None, {})

    # ------------------------------------------------------------------ checkpoint keys
    def read(self, key: str, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Rows ``start:stop`` (first axis) of stored tensor ``key``; the whole tensor by default."""
        return self._load({key: (key, start, stop)})[key]

    def row_starts(self, key: str) -> list[int]:
        """First-axis offsets where stored chunks of ``key`` begin: reading between two of them
        reads no stored byte twice."""
        return list(self.meta[key].row_starts)

    def read_objects(self) -> dict[str, "io.BytesIO"]:
        """The non-tensor model entries, as the serialized bytes torch DCP stored."""
        import io

        import torch.distributed.checkpoint as dcp

        objects = {k: io.BytesIO() for k in self.objects}
        if objects:
            dcp.load(objects, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        return objects

    def _load(self, requests: dict[str, tuple[str, Optional[int], Optional[int]]]) -> dict[str, torch.Tensor]:
        """Read row ranges of stored tensors straight through torch DCP (out name -> (key, start, stop)).

        megatron-core's load (and a torch ShardedTensor) must describe a tensor's full coverage,
        which in one process means allocating every layer; :class:`_SlicePlanner` instead asks DCP
        for the stored chunks that overlap the one slice wanted.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

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
        dcp.load(state, storage_reader=dcp.FileSystemReader(self.path), planner=_SlicePlanner(chunks), no_dist=True)
        return state

    # ------------------------------------------------------------------ canonical GPT names
    @staticmethod
    def stored_key(name: str) -> tuple[str, Optional[int]]:
        """(key in the checkpoint, layer index into its stacked first axis or None)."""
        if not name.startswith("decoder.layers."):
            return name, None
        _, _, i, suffix = name.split(".", 3)
        return "decoder.layers." + _STORED_LAYER_KEY.get(suffix, suffix), int(i)

    def keys(self) -> list[str]:
        names = ["embedding.word_embeddings.weight"]
        for i in range(self.num_layers):
            names += [f"decoder.layers.{i}.{s}" for s in LAYER_SUFFIXES if self.stored_key(f"decoder.layers.{i}.{s}")[0] in self.meta]
        names.append("decoder.final_layernorm.weight")
        if "output_layer.weight" in self.meta:
            names.append("output_layer.weight")
        return names

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a canonical tensor, from the metadata alone."""
        key, layer = self.stored_key(name)
        if key not in self.meta:
            raise ConversionError(f"{self.path}: tensor {key!r} (for {name}) not in the checkpoint")
        m = self.meta[key]
        return (tuple(m.global_shape[1:]) if layer is not None else tuple(m.global_shape)), m.dtype

    def get(self, name: str) -> torch.Tensor:
        key, layer = self.stored_key(name)
        if layer is None:
            self._cache = (None, {})  # the layers are done: do not hold one beside a vocabulary-sized tensor
            return self.read(key)
        if self._cache[0] != layer:
            self._cache = (None, {})  # drop the previous layer before reading the next
            names = {f"decoder.layers.{layer}.{s}" for s in LAYER_SUFFIXES}
            requests = {n: (k, i, i + 1) for n in names for k, i in [self.stored_key(n)] if k in self.meta}
            self._cache = (layer, {n: t[0] for n, t in self._load(requests).items()})
        if name not in self._cache[1]:
            raise ConversionError(f"{self.path}: tensor {key!r} (for {name}) not in the checkpoint")
        return self._cache[1][name]

    __getitem__ = get

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get(name)


def _slice_planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
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

    return SlicePlanner


def _SlicePlanner(chunks):
    return _slice_planner_class()(chunks)


def load_mcore_canonical(ckpt_dir: str | os.PathLike, names: Optional[Iterable[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical name, full tensor) from a dist checkpoint, streaming one layer at a time.

    ``names`` restricts (and orders) what is read; by default every tensor, layer by layer. For
    averaging, iterate several checkpoints' generators in lock-step. Initialises a one-process
    CPU world if torch.distributed is not running.
    """
    if not torch.distributed.is_initialized():
        from megatron_apriel.runtime import init_distributed

        init_distributed(device="cpu", seed=None)
    reader = McoreCheckpointReader(ckpt_dir)
    for name in (list(names) if names is not None else reader.keys()):
        yield name, reader.get(name)


# --------------------------------------------------------------------------- mcore -> HF
def _hf_config(preset: ModelPreset, side: Optional[Path], dtype: torch.dtype):
    """The source config when it describes this architecture (keeps every field), else the preset's."""
    from transformers import AutoConfig

    if side is not None and (side / "config.json").is_file():
        from megatron_apriel.models.hf_config import HFConfigError

        cfg = AutoConfig.from_pretrained(side)
        try:
            same = not ModelPreset.from_hf_config(cfg).function_differences(preset)
        except HFConfigError:  # a source this version refuses (converted by an older one): the preset's
            same = False
        if same and getattr(cfg, "text_config", None) is None:
            cfg.dtype = dtype
            return cfg
    cfg = preset.hf_config()
    cfg.dtype = dtype
    return cfg


def mcore_to_hf_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, preset: Optional[str | ModelPreset] = None,
                           tokenizer: Optional[str] = None, chat_template: Optional[str] = None,
                           dtype: Optional[str | torch.dtype] = None, max_shard_bytes: int = 5 * 1024**3,
                           force: bool = False) -> dict:
    """Write an HF MistralForCausalLM folder from a dist checkpoint, streaming tensor by tensor.

    ``preset``: a preset name or object; default: ``apriel_model.yaml`` beside the checkpoint.
    ``tokenizer``: folder with tokenizer files; default: those stored at conversion time.
    ``chat_template``: a template name (``apriel``, ``apriel-nemotron``, ``apriel-1.5``; its role tokens then
    take reserved special slots of the exported tokenizer) or a path to a .jinja file, written as
    ``chat_template.jinja``; default: the released format of the preset (apriel-nemotron-15b,
    apriel-1.5-15b), else the tokenizer's own.
    """
    start = time.time()
    if not torch.distributed.is_initialized():
        from megatron_apriel.runtime import init_distributed

        init_distributed(device="cpu", seed=None)
    reader = McoreCheckpointReader(ckpt_dir)
    stored_dtype = None
    if isinstance(preset, str):
        preset = get_preset(preset)
    if preset is None:
        preset, stored_dtype = read_model_meta(reader.path)
    from megatron_apriel.data.chat_template import default_chat_template

    chat_template = default_chat_template(chat_template, preset.name, fallback=None, who="mcore-to-hf")
    if preset.num_layers != reader.num_layers:
        raise ConversionError(f"{reader.path}: {reader.num_layers} layers stored but preset {preset.name} has {preset.num_layers}")
    if preset.vision is not None and "vision_model.patch_conv.weight" in reader.meta:
        from megatron_apriel.checkpoint import llava

        return llava.mcore_to_hf_checkpoint(ckpt_dir, out_dir, preset, tokenizer=tokenizer, chat_template=chat_template,
                                            dtype=dtype, max_shard_bytes=max_shard_bytes, force=force)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    dtype = dtype or reader.meta["embedding.word_embeddings.weight"].dtype
    side = Path(reader.path) / HF_SIDE
    side = side if side.is_dir() else None
    template = read_chat_template(chat_template)

    # The HF names and shapes, from the stored metadata alone (the mapping run on meta tensors),
    # let the writer lay out every shard up front and write each tensor as soon as it is read.
    layout = [(name, tuple(t.shape), dtype) for name, t in mistral.mcore_to_hf(
        lambda n: torch.empty(reader.shape_dtype(n)[0], dtype=reader.shape_dtype(n)[1], device="meta"), preset)]
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes, layout=layout)
        bar = _progress(len(layout), "mcore-to-hf")
        try:
            for name, t in mistral.mcore_to_hf(reader.get, preset):
                writer.add(name, t.to(dtype))
                del t
                bar.update(1)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        bar.close()
        _hf_config(preset, side, dtype).save_pretrained(tmp)
        copied = write_hf_side_files(tmp, out_dir, preset, side, tokenizer, template)
    summary = {"tensors": writer.num_tensors, "bytes": writer.total_bytes, "dtype": _dtype_name(dtype),
               "seconds": round(time.time() - start, 2), "tokenizer_files": copied}
    _log(f"mcore-to-hf: {writer.num_tensors} tensors, {writer.total_bytes / 1e9:.3f} GB, {_dtype_name(dtype)}, "
         f"{summary['seconds']:.1f} s -> {out_dir}")
    return summary


def read_chat_template(chat_template: Optional[str]) -> Optional[str]:
    """A template name (``apriel``, ``apriel-nemotron``, ``apriel-1.5``) -> that template; a path -> that file's
    text; None -> None."""
    from megatron_apriel.data.chat_template import CHAT_TEMPLATES

    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    return Path(chat_template).read_text(encoding="utf-8") if chat_template else None


def write_hf_side_files(tmp: Path, out_dir, preset: ModelPreset, side: Optional[Path], tokenizer: Optional[str],
                        template: Optional[str]) -> list[str]:
    """Everything of an exported HF folder but its tensors and config: the generation config (the
    stored one, else the preset's special tokens), the tokenizer (``tokenizer`` or the files stored at
    conversion time) with an image processor's files when there are any, and the chat template.
    Returns the tokenizer files copied."""
    from transformers import GenerationConfig

    if side is not None and (side / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(side).save_pretrained(tmp)
    else:
        GenerationConfig(bos_token_id=preset.bos_token_id, eos_token_id=preset.eos_token_id).save_pretrained(tmp)
    tok_src = Path(tokenizer) if tokenizer else side
    copied = []
    if tok_src is not None:
        for f in ("preprocessor_config.json", "processor_config.json"):  # a Llava's image processor travels too
            if (tok_src / f).is_file():
                (tmp / f).write_bytes((tok_src / f).read_bytes())
        try:
            copied = _copy_tokenizer(tok_src, tmp)
        except ConversionError:
            if tokenizer:
                raise
    if not copied:
        print(f"warning: no tokenizer files written to {out_dir}; pass --tokenizer DIR", file=sys.stderr)
    if template is not None:
        _role_tokens_for(tmp, template)
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        cfg_path = tmp / "tokenizer_config.json"
        if cfg_path.is_file():  # one source of truth for the template
            tok_cfg = json.loads(cfg_path.read_text())
            if tok_cfg.pop("chat_template", None) is not None:
                cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    return copied


def _role_tokens_for(tok_dir: Path, template: str) -> None:
    """A named Apriel format's role tokens take reserved special slots of the exported tokenizer (see
    megatron_apriel.data.chat_tokenizer), so the folder renders and encodes turns as the format does;
    a tokenizer without free slots is exported as it is, with a warning."""
    from megatron_apriel.data.chat_template import CHAT_TEMPLATES
    from megatron_apriel.data.chat_tokenizer import ChatTokenizerError, assign_role_tokens, role_tokens

    if template not in CHAT_TEMPLATES.values() or not (tok_dir / "tokenizer.json").is_file():
        return
    try:
        ids = assign_role_tokens(tok_dir, role_tokens(template))
    except ChatTokenizerError as e:
        print(f"warning: {e}: the exported chat template's role tokens are encoded as text", file=sys.stderr)
        return
    print("chat template role tokens: " + ", ".join(f"{t}={i}" for t, i in ids.items()), file=sys.stderr)


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="apriel convert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors folder -> megatron-core dist checkpoint")
    a.add_argument("--hf", required=True, help="HF folder (config.json + safetensors)")
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1, help="run under torchrun with tp*pp processes when > 1")
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the HF tensors' dtype")
    a.add_argument("--tokenizer", default=None, help="tokenizer folder to store instead of the HF folder's")
    a.add_argument("--force", action="store_true", help="replace a non-empty --out")
    b = sub.add_parser("mcore-to-hf", help="megatron-core dist checkpoint -> HF folder")
    b.add_argument("--ckpt", required=True, help="dist checkpoint folder, iter_* folder or training save root")
    b.add_argument("--out", required=True)
    b.add_argument("--preset", default=None, help=f"default: {MODEL_META} beside the checkpoint")
    b.add_argument("--tokenizer", default=None, help="default: the tokenizer stored at conversion")
    b.add_argument("--chat-template", default=None,
                   help="'apriel', 'apriel-nemotron', 'apriel-1.5' or a .jinja file (default: the released format of "
                        "the preset, apriel-nemotron-15b -> apriel-nemotron, apriel-1.5-15b -> apriel-1.5; else the "
                        "tokenizer's own)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the stored dtype")
    b.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 5GB, 500MB)")
    b.add_argument("--force", action="store_true")
    return ap


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "hf-to-mcore":
            hf_to_mcore_checkpoint(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                   tokenizer=args.tokenizer, force=args.force)
        else:
            mcore_to_hf_checkpoint(args.ckpt, args.out, preset=args.preset, tokenizer=args.tokenizer,
                                   chat_template=args.chat_template, dtype=args.dtype,
                                   max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    except (ConversionError, SafetensorsFileError, FileExistsError, FileNotFoundError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
