"""The Llava/Pixtral family: HF LlavaForConditionalGeneration <-> megatron-core LlavaModel.

This module is the family's driver for :mod:`megatron_apriel.checkpoint.convert` (the same
functions as :mod:`megatron_apriel.checkpoint.mistral`: HF config mapping, name table, loader, TP
rules). Its table extends the Mistral one, which maps the decoder under the on-disk prefix
``language_model.model``. Canonical megatron names are those of a TP=1
:class:`megatron_apriel.models.llava.LlavaModel`'s dist checkpoint: decoder names exactly as a text
GPTModel's (``embedding.*``, ``decoder.layers.{i}.*``, ``output_layer.weight``), then

* ``vision_model.patch_conv.weight``, ``vision_model.ln_pre.weight``;
* ``vision_model.transformer.layers.{i}.<suffix>``: the suffixes of the Mistral table, with the
  Pixtral names in :data:`VISION_LAYER_COPY` / :data:`VISION_LAYER_FUSED`; ``linear_qkv`` is the
  grouped layout of ``pack_qkv`` with one group per head (Pixtral attention is MHA);
* ``vision_projection.encoder.linear_fc{1,2}.{weight,bias}`` = ``multi_modal_projector.linear_{1,2}``.

HF names are read in either layout transformers knows (hub: ``vision_tower.``, ``language_model.model.``;
in-memory v5: ``model.vision_tower.``, ``model.language_model.``) and always written in the hub layout
of Pixtral-12B. Only ``vision_feature_layer = -1`` with strategy ``full`` (Pixtral's) is supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from transformers import LlavaConfig, PixtralVisionConfig

from megatron_apriel.checkpoint import mistral
from megatron_apriel.checkpoint import table as tbl
from megatron_apriel.checkpoint.dcp_io import ConversionError
from megatron_apriel.checkpoint.table import Entry
from megatron_apriel.models.hf_config import check_hf_config
from megatron_apriel.models.llava import LlavaModel, build_llava_chunks, vision_layers_preset
from megatron_apriel.models.presets import ModelPreset, VisionPreset

NAME = "Llava"
LABEL = " (llava)"

VISION_LAYER_COPY = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attention.linear_proj.weight": "attention.o_proj.weight",
    "pre_mlp_layernorm.weight": "ffn_norm.weight",
    "mlp.linear_fc2.weight": "feed_forward.down_proj.weight",
}
VISION_LAYER_FUSED = {
    "self_attention.linear_qkv.weight": ("attention.q_proj.weight", "attention.k_proj.weight",
                                         "attention.v_proj.weight"),
    "mlp.linear_fc1.weight": ("feed_forward.gate_proj.weight", "feed_forward.up_proj.weight"),
}
# canonical -> (HF prefix: the vision tower's or the projector's, HF suffix, TP dim or None); the
# layers follow mistral.TP_DIM.
VISION_GLOBAL = {
    "vision_model.patch_conv.weight": ("vision", "patch_conv.weight", None),
    "vision_model.ln_pre.weight": ("vision", "ln_pre.weight", None),
    "vision_projection.encoder.linear_fc1.weight": ("projector", "linear_1.weight", 0),
    "vision_projection.encoder.linear_fc1.bias": ("projector", "linear_1.bias", 0),
    "vision_projection.encoder.linear_fc2.weight": ("projector", "linear_2.weight", 1),
    "vision_projection.encoder.linear_fc2.bias": ("projector", "linear_2.bias", None),
}
VISION_LAYER_PREFIX = "vision_model.transformer.layers."
# On-disk layouts: (decoder prefix, lm_head, vision prefix, projector prefix).
HUB_LAYOUT = ("language_model.model", "language_model.lm_head.weight", "vision_tower", "multi_modal_projector")
V5_LAYOUT = ("model.language_model", "lm_head.weight", "model.vision_tower", "model.multi_modal_projector")
LAYOUT = HUB_LAYOUT  # the layout written


# --------------------------------------------------------------------------- configs
def preset_from_hf_config(cfg, name: str = "from-hf") -> ModelPreset:
    """A multimodal preset from a transformers LlavaConfig with a Pixtral vision config.

    The text and vision configs go through :func:`models.hf_config.check_hf_config`, which refuses
    (``HFConfigError``, a ValueError naming the field) what the megatron-core model cannot compute.
    """
    checked = check_hf_config(cfg)
    if checked.vision is None:
        raise ValueError(f"{name}: no vision_config; not a Llava/Pixtral config")
    return ModelPreset(name=name, hf_architecture="LlavaForConditionalGeneration",
                       vision=VisionPreset(**checked.vision), **checked.text)


def hf_config(preset: ModelPreset, dtype: Optional[torch.dtype] = None):
    """The transformers LlavaConfig (Pixtral vision, Mistral text) of a multimodal preset."""
    v = preset.vision
    vision = PixtralVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads, num_channels=v.num_channels, image_size=v.image_size,
        patch_size=v.patch_size, hidden_act=v.hidden_act,
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=preset.hf_config(), image_token_index=v.image_token_id,
        projector_hidden_act=v.projector_hidden_act, vision_feature_select_strategy="full",
        vision_feature_layer=-1, multimodal_projector_bias=True, tie_word_embeddings=not preset.untie_embeddings,
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def export_config(preset: ModelPreset, side: Optional[Path], dtype: torch.dtype):
    """Always the preset's LlavaConfig (the source config's text/vision split is rebuilt from it)."""
    return hf_config(preset, dtype)


# --------------------------------------------------------------------------- the table
def _hf_global(canon: str, layout) -> str:
    where, suffix, _ = VISION_GLOBAL[canon]
    return f"{layout[2] if where == 'vision' else layout[3]}.{suffix}"


def vision_table(vision: VisionPreset, layout=HUB_LAYOUT) -> list[Entry]:
    """The vision encoder and projector entries: globals, then each layer."""
    out = [Entry(c, (_hf_global(c, layout),), tp_dim=dim) for c, (_, _, dim) in VISION_GLOBAL.items()]
    lp = vision_layers_preset(vision)
    for i in range(vision.num_layers):
        out += mistral.layer_entries(f"{VISION_LAYER_PREFIX}{i}.", f"{layout[2]}.transformer.layers.{i}.", lp,
                                     VISION_LAYER_COPY, VISION_LAYER_FUSED)
    return out


def table(preset: ModelPreset, layout=HUB_LAYOUT) -> list[Entry]:
    """Every canonical tensor of a Llava checkpoint: decoder (Mistral table), then vision."""
    return mistral.table(preset, layout[:2]) + vision_table(preset.vision, layout)


def hf_names(preset: ModelPreset, layout=HUB_LAYOUT) -> list[str]:
    """Every HF tensor name a Llava checkpoint of this preset must contain."""
    return mistral.hf_names(preset, *layout[:2]) + tbl.hf_names(vision_table(preset.vision, layout))


def hf_to_mcore(get, preset: ModelPreset, layout=HUB_LAYOUT) -> Iterator[tuple[str, torch.Tensor]]:
    """Every canonical tensor of a Llava checkpoint: decoder (Mistral table), then vision."""
    return tbl.hf_to_mcore(get, table(preset, layout))


def mcore_to_hf(get, preset: ModelPreset, layout=HUB_LAYOUT) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor (hub layout) from canonical tensors."""
    return tbl.mcore_to_hf(get, table(preset, layout))


def detect_layout(keys: Iterable[str], folder=None) -> tuple[str, str, str, str]:
    keys = set(keys)
    for layout in (HUB_LAYOUT, V5_LAYOUT):
        if f"{layout[2]}.patch_conv.weight" in keys:
            return layout
    raise ConversionError(f"{folder}: no vision_tower.patch_conv.weight: not a Llava/Pixtral checkpoint")


def hf_canonical(reader, preset: ModelPreset) -> tbl.HFCanonical:
    """The lazy canonical view of an HF Llava folder (refuses missing or unknown tensors)."""
    return tbl.HFCanonical(reader, table(preset, detect_layout(reader.keys(), reader.folder)), NAME, preset.num_layers)


# --------------------------------------------------------------------------- TP shards of vision tensors
def tp_rule(canon: str) -> tuple[Optional[int], bool]:
    if canon in VISION_GLOBAL:
        return VISION_GLOBAL[canon][2], False
    if canon.startswith(VISION_LAYER_PREFIX):  # same layouts as the decoder's (qkv groups, gated fc1)
        return mistral.tp_rule("decoder.layers.0." + canon[len(VISION_LAYER_PREFIX):].split(".", 1)[1])
    raise KeyError(f"no TP layout known for tensor {canon!r}")


def shard_tp(canon: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    return tbl.shard(full, *tp_rule(canon), tp_rank, tp_size)


def unshard_tp(canon: str, shards: list[torch.Tensor]) -> torch.Tensor:
    return tbl.unshard(shards, *tp_rule(canon))


# --------------------------------------------------------------------------- the model
def build_chunks(preset: ModelPreset, config) -> list:
    return build_llava_chunks(preset, config)


def _unwrap(chunk):
    m = chunk
    while not isinstance(m, LlavaModel):
        if not hasattr(m, "module"):
            raise TypeError(f"{type(chunk).__name__} is not a LlavaModel")
        m = m.module
    return m


def _vision_params(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for part in ("vision_model", "vision_projection"):
        module = getattr(model, part)
        if module is not None:
            for name, p in module.named_parameters():
                yield f"{part}.{name}", p


def load_canonical_into_llava(chunks, canonical, preset: ModelPreset) -> None:
    """Copy canonical full tensors into this rank's LlavaModel chunks (decoder at any TP/PP)."""
    models = [_unwrap(c) for c in chunks]
    mistral.load_canonical_into_chunks([m.language_model for m in models], canonical, preset)
    missing = tbl.load_params((p for m in models for p in _vision_params(m)), canonical, tp_rule)
    if missing:
        raise KeyError(f"tensors missing from the checkpoint: {sorted(set(missing))}")


load_canonical = load_canonical_into_llava  # the family driver's name


def gather_llava_canonical(chunks, preset: ModelPreset) -> dict[str, torch.Tensor]:
    """Every canonical full tensor of a TP/PP-sharded LlavaModel, on every rank (small models only)."""
    models = [_unwrap(c) for c in chunks]
    out = mistral.gather_canonical([m.language_model for m in models], preset)
    out.update(tbl.gather_params((p for m in models for p in _vision_params(m)), tp_rule))
    return out
