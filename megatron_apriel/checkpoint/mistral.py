"""The Mistral text family: HF MistralForCausalLM <-> megatron-core GPTModel, one explicit table.

This module is the family's driver for :mod:`megatron_apriel.checkpoint.convert`: its HF config
mapping (:func:`preset_from_hf_config`, :func:`export_config`), its one name table
(:data:`LAYER_COPY`, :data:`LAYER_FUSED`, :data:`GLOBAL_COPY`, :data:`TP_DIM`, turned into
:class:`~megatron_apriel.checkpoint.table.Entry` rows by :func:`table`), its model builder and
loader (:func:`build_chunks`, :func:`load_canonical_into_chunks`) and its TP layout
(:func:`shard_tp`; what TP must divide is the family's, :mod:`megatron_apriel.models.families`).
The Llava family reuses this table for its decoder.

Layouts that differ from HF (checked against transformers, see tests/test_parity.py):

* ``linear_qkv``: for each KV group g, [q rows of the heads of g; k rows of g; v rows of g],
  stacked over groups. A contiguous TP shard of this tensor is exactly the rows of that rank's
  groups, so TP slicing is a plain ``chunk`` on dim 0.
* ``linear_fc1`` = cat(gate_proj, up_proj). A TP shard is [gate_shard; up_shard], not a chunk.
* ``input_layernorm`` / ``pre_mlp_layernorm`` = HF ``input_layernorm`` / ``post_attention_layernorm``.
* embeddings and output layer are padded with zero rows to the padded vocabulary inside the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from megatron.core import parallel_state
from transformers import AutoConfig

from megatron_apriel.checkpoint import table as tbl
from megatron_apriel.checkpoint.dcp_io import TE_NORM_KEYS, ConversionError
from megatron_apriel.checkpoint.table import Entry, pack_qkv, unpack_qkv  # noqa: F401  (the family's public API)
from megatron_apriel.models.builder import build_model_chunks
from megatron_apriel.models.hf_config import HFConfigError
from megatron_apriel.models.presets import ModelPreset, padded_vocab_size

NAME = "Mistral"  # in messages: "tensors the Mistral table does not know"
LABEL = ""  # appended to progress bars and summary lines

# Per-layer names: canonical megatron suffix -> HF suffix, for tensors that are copied as they are.
LAYER_COPY = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# Per-layer tensors built from several HF tensors.
LAYER_FUSED = {
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
assert tuple(LAYER_COPY) + tuple(LAYER_FUSED) == tbl.LAYER_SUFFIXES  # every GPT layer tensor, in stream order
# Tensors outside the layers: canonical name -> HF name under the decoder prefix (``model`` in a
# MistralForCausalLM); None: the layout's lm_head, which sits beside the decoder, not under it.
EMBEDDING, FINAL_NORM, OUTPUT = tbl.EMBEDDING, tbl.FINAL_NORM, tbl.OUTPUT
GLOBAL_COPY = {EMBEDDING: "embed_tokens.weight", FINAL_NORM: "norm.weight", OUTPUT: None}
VOCAB_TENSORS = (EMBEDDING, OUTPUT)

# TP layout of each canonical tensor: dim split across ranks, or None when replicated.
TP_DIM = {
    EMBEDDING: 0,
    OUTPUT: 0,
    FINAL_NORM: None,
    "input_layernorm.weight": None,
    "pre_mlp_layernorm.weight": None,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,  # gated: each half chunked separately, see shard_tp
    "mlp.linear_fc2.weight": 1,
}
_FUSE = {"self_attention.linear_qkv.weight": tbl.QKV, "mlp.linear_fc1.weight": tbl.GATED}

# On-disk layouts: (decoder prefix, lm_head): MistralForCausalLM, the Pixtral/Llava hub layout, the
# Llava layout of transformers v5's in-memory names.
LAYOUT = ("model", "lm_head.weight")
LAYOUTS = (LAYOUT, ("language_model.model", "language_model.lm_head.weight"),
           ("model.language_model", "lm_head.weight"))


# --------------------------------------------------------------------------- the table
def layer_entries(mc: str, hf: str, preset: ModelPreset, copy: dict = LAYER_COPY, fused: dict = LAYER_FUSED
                  ) -> list[Entry]:
    """The entries of one transformer layer: canonical prefix ``mc``, HF prefix ``hf`` (the Llava
    vision layers use the same canonical suffixes with Pixtral's HF names)."""
    out = [Entry(mc + s, (hf + h,), tp_dim=TP_DIM[s]) for s, h in copy.items()]
    out += [Entry(mc + s, tuple(hf + h for h in parts), _FUSE[s], TP_DIM[s], heads=preset)
            for s, parts in fused.items()]
    return out


def table(preset: ModelPreset, layout: tuple[str, str] = LAYOUT) -> list[Entry]:
    """Every canonical tensor of a checkpoint of ``preset``, in streaming order: embeddings, layers,
    final norm, output layer (when untied)."""
    prefix, lm_head = layout
    glob = {c: Entry(c, (f"{prefix}.{h}" if h else lm_head,), tp_dim=TP_DIM[c],
                     vocab=preset.vocab_size if c in VOCAB_TENSORS else None) for c, h in GLOBAL_COPY.items()}
    out = [glob[EMBEDDING]]
    for i in range(preset.num_layers):
        out += layer_entries(f"decoder.layers.{i}.", f"{prefix}.layers.{i}.", preset)
    out.append(glob[FINAL_NORM])
    if preset.untie_embeddings:
        out.append(glob[OUTPUT])
    return out


def hf_names(preset: ModelPreset, hf_prefix: str = "model", lm_head: str = "lm_head.weight") -> list[str]:
    """Every HF tensor name a checkpoint of this preset must contain: the globals, then the layers."""
    entries = table(preset, (hf_prefix, lm_head))
    return tbl.hf_names(sorted(entries, key=lambda e: e.canon.startswith("decoder.layers.")))


def hf_to_mcore(get: Callable[[str], torch.Tensor], preset: ModelPreset, hf_prefix: str = "model",
                lm_head: str = "lm_head.weight") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical megatron name, tensor) pairs, reading HF tensors through ``get``.

    ``hf_prefix`` is ``model`` for MistralForCausalLM and ``language_model.model`` for the on-disk
    Pixtral/Llava layout.
    """
    return tbl.hf_to_mcore(get, table(preset, (hf_prefix, lm_head)))


def mcore_to_hf(get: Callable[[str], torch.Tensor], preset: ModelPreset, hf_prefix: str = "model",
                lm_head: str = "lm_head.weight") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) pairs from canonical megatron tensors read through ``get``."""
    return tbl.mcore_to_hf(get, table(preset, (hf_prefix, lm_head)))


# --------------------------------------------------------------------------- HF configs and folders
def preset_from_hf_config(cfg, name: str = "from-hf") -> ModelPreset:
    return ModelPreset.from_hf_config(cfg, name=name)


def export_config(preset: ModelPreset, side: Optional[Path], dtype: torch.dtype):
    """The source config when it describes this architecture (keeps every field), else the preset's."""
    if side is not None and (side / "config.json").is_file():
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


def detect_layout(keys: Iterable[str], folder) -> tuple[str, str]:
    """Decoder prefix and lm_head name: MistralForCausalLM, or the Llava/Pixtral on-disk layouts."""
    keys = set(keys)
    for layout in LAYOUTS:
        if f"{layout[0]}.{GLOBAL_COPY[EMBEDDING]}" in keys:
            return layout
    raise ConversionError(f"{folder}: no embed_tokens tensor; not a Mistral-family checkpoint")


def hf_canonical(reader, preset: ModelPreset) -> tbl.HFCanonical:
    """The lazy canonical view of an HF folder (vision tensors of a Llava folder are left alone)."""
    entries = table(preset, detect_layout(reader.keys(), reader.folder))
    ignore = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
    return tbl.HFCanonical(reader, entries, NAME, preset.num_layers, ignore)


# --------------------------------------------------------------------------- TP
def _suffix(name: str) -> str:
    if name.startswith("decoder.layers."):
        return name.split(".", 3)[3]
    return name


def tp_rule(name: str) -> tuple[Optional[int], bool]:
    suffix = _suffix(name)
    if suffix not in TP_DIM:
        raise KeyError(f"no TP layout known for tensor {name!r}")
    return TP_DIM[suffix], _FUSE.get(suffix) == tbl.GATED


def shard_tp(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The TP shard of a canonical tensor held by ``tp_rank``."""
    return tbl.shard(full, *tp_rule(name), tp_rank, tp_size)


def unshard_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard_tp` given every rank's shard in TP-rank order."""
    return tbl.unshard(shards, *tp_rule(name))


# --------------------------------------------------------------------------- the model
def build_chunks(preset: ModelPreset, config) -> list:
    return build_model_chunks(preset, config)


def _pad_vocab(name: str, t: torch.Tensor, padded: int) -> torch.Tensor:
    if name in VOCAB_TENSORS and t.shape[0] < padded:
        pad = t.new_zeros((padded - t.shape[0], *t.shape[1:]))  # on t's device: GPU tensors load too
        return torch.cat([t, pad], dim=0)
    return t


def local_to_canonical_names(chunk) -> dict[str, str]:
    """Map each parameter name of a model chunk to its canonical (global-layer) name.

    Transformer Engine specs fuse the norms into the following linear layer; those names are mapped
    to the local-spec names so that one canonical table serves both.
    """
    out = {}
    te_norms = {v: k for k, v in TE_NORM_KEYS.items()}
    layers = chunk.decoder.layers if getattr(chunk, "decoder", None) is not None else []
    offsets = {str(j): layer.layer_number - 1 for j, layer in enumerate(layers)}
    for name, _ in chunk.named_parameters():
        canon = name
        if name.startswith("decoder.layers."):
            _, _, j, rest = name.split(".", 3)
            rest = te_norms.get(rest, rest)
            canon = f"decoder.layers.{offsets[j]}.{rest}"
        out[name] = canon
    return out


def _gpt_modules(chunks: Iterable[torch.nn.Module]) -> Iterator[torch.nn.Module]:
    for chunk in chunks:
        module = chunk
        while hasattr(module, "module") and not hasattr(module, "decoder"):
            module = module.module
        yield module


def canonical_params(chunks: Iterable[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) of this rank's GPT model chunks (wrappers such as DDP looked through)."""
    for module in _gpt_modules(chunks):
        params = dict(module.named_parameters())
        for local, canon in local_to_canonical_names(module).items():
            yield canon, params[local]


def load_canonical_into_chunks(chunks: Iterable[torch.nn.Module], canonical, preset: ModelPreset) -> None:
    """Copy canonical full tensors into this rank's model chunks (any TP/PP/VPP layout)."""
    padded = padded_vocab_size(preset.vocab_size, parallel_state.get_tensor_model_parallel_world_size())
    missing = tbl.load_params(canonical_params(chunks), canonical, tp_rule, lambda n, t: _pad_vocab(n, t, padded))
    if missing:
        raise KeyError(f"tensors missing from the checkpoint: {sorted(set(missing))}")


load_canonical = load_canonical_into_chunks  # the family driver's name


def gather_canonical(chunks: Iterable[torch.nn.Module], preset: ModelPreset) -> dict[str, torch.Tensor]:
    """Every canonical full tensor of a TP/PP-sharded model, on every rank (CPU tensors).

    Meant for small models (tests, tiny demos, comparisons): it gathers everything into memory.
    Large checkpoints go through dist_checkpointing instead.
    """
    out = tbl.gather_params(canonical_params(chunks), tp_rule)
    return trim_vocab(out, preset)


def trim_vocab(canonical: dict[str, torch.Tensor], preset: ModelPreset) -> dict[str, torch.Tensor]:
    """Drop the vocabulary padding rows of the embedding and output layer (in place; returned)."""
    for name in VOCAB_TENSORS:
        if name in canonical:
            canonical[name] = canonical[name][: preset.vocab_size].clone()
    return canonical
