"""The model families: one typed entry per kind of model, looked up instead of branched on.

A preset is an architecture's numbers; its family is what to do with them: which megatron-core
model to build, which HF <-> megatron-core checkpoint driver converts it, what tensor parallelism
must divide, which parameter groups can be frozen, and how images reach it. Training, the run plan,
the dry run, conversion and ``apriel model-info`` ask :func:`family_of` (or :func:`family_of_hf_config`)
and never test "is this a vision model" themselves, so adding a family is one :func:`register` call
with its builder and its checkpoint driver.

The checkpoint driver is named, not imported: drivers live in :mod:`megatron_apriel.checkpoint`, a
layer above this one (they build models through these entries), and ``checkpoint.convert`` imports
the named module when it converts. What a driver module offers is listed in ``checkpoint/convert.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megatron_apriel.models.presets import ImageLayout, ModelPreset


@dataclass(frozen=True)
class ModelFamily:
    name: str
    description: str
    # whether a preset is of this family (checked in registration order, the newest first)
    claims: Callable[[ModelPreset], bool]
    # whether an HF config.json (a dict) is of this family, for conversion from HF
    claims_hf_config: Callable[[dict], bool]
    # (preset, TransformerConfig, use_te=False, max_sequence_length=4096) -> this rank's model chunks
    build_chunks: Callable[..., list]
    # (what, size) pairs that model.tp must divide
    tp_divides: Callable[[ModelPreset], list[tuple[str, int]]]
    freeze_groups: tuple[str, ...]
    checkpoint_driver: str  # module of the HF <-> megatron-core driver (see module docstring)
    image_layout: Optional[Callable[[ModelPreset], ImageLayout]] = None  # None: a text model

    @property
    def has_images(self) -> bool:
        return self.image_layout is not None


def _text_tp(preset: ModelPreset) -> list[tuple[str, int]]:
    return [("the attention heads", preset.num_attention_heads), ("the query groups", preset.num_query_groups),
            ("the FFN size", preset.ffn_hidden_size)]


def _llava_tp(preset: ModelPreset) -> list[tuple[str, int]]:
    v = preset.vision
    return _text_tp(preset) + [("the vision encoder's attention heads", v.num_attention_heads),
                               ("the vision encoder's FFN size", v.ffn_hidden_size),
                               ("the hidden size (projector)", preset.hidden_size)]


def _build_text(preset, config, use_te: bool = False, max_sequence_length: int = 4096, **fp8):
    from megatron_apriel.models.builder import build_model_chunks  # megatron-core: only when building

    return build_model_chunks(preset, config, use_te, max_sequence_length=max_sequence_length, **fp8)


def _build_llava(preset, config, use_te: bool = False, max_sequence_length: int = 4096):
    from megatron_apriel.models.llava import build_llava_chunks  # megatron-core: only when building

    return build_llava_chunks(preset, config, use_te, max_sequence_length=max_sequence_length)


TEXT_GROUPS = ("embeddings", "decoder", "output_layer")

TEXT = ModelFamily(
    name="text", description="Mistral/Llama decoder (MistralForCausalLM, LlamaForCausalLM)",
    claims=lambda p: p.vision is None, claims_hf_config=lambda cfg: "vision_config" not in cfg,
    build_chunks=_build_text, tp_divides=_text_tp, freeze_groups=TEXT_GROUPS,
    checkpoint_driver="megatron_apriel.checkpoint.mistral")

LLAVA = ModelFamily(
    name="llava", description="LLaVA: Pixtral vision encoder, 2-layer projector, Mistral decoder",
    claims=lambda p: p.vision is not None, claims_hf_config=lambda cfg: "vision_config" in cfg,
    build_chunks=_build_llava, tp_divides=_llava_tp, freeze_groups=TEXT_GROUPS + ("vision_encoder", "projector"),
    checkpoint_driver="megatron_apriel.checkpoint.llava", image_layout=lambda p: p.vision.image_layout())

# newest first: a family registered later may claim presets an older one would take
FAMILIES: list[ModelFamily] = [LLAVA, TEXT]


def register(family: ModelFamily) -> ModelFamily:
    """Add a family (it is asked before the built-in ones); its name must be new."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a model family named {family.name!r} is already registered")
    FAMILIES.insert(0, family)
    return family


def unregister(name: str) -> None:
    FAMILIES[:] = [f for f in FAMILIES if f.name != name]


def family_of(preset: ModelPreset) -> ModelFamily:
    for family in FAMILIES:
        if family.claims(preset):
            return family
    raise ValueError(f"no model family builds preset {preset.name!r} (families: {[f.name for f in FAMILIES]})")


def family_of_hf_config(cfg: dict) -> ModelFamily:
    for family in FAMILIES:
        if family.claims_hf_config(cfg):
            return family
    raise ValueError(f"no model family reads this HF config (architectures {cfg.get('architectures')})")
