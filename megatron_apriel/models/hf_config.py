"""The one check of a Hugging Face config against what this project's megatron-core models compute.

Everything that starts from an HF folder (``convert hf-to-mcore``, upscaling, averaging, and so
training from a converted checkpoint) builds its preset here. A config field the preset does not
carry would silently train a different model: a dropped rope scaling moves every position, a dropped
sliding window attends to the whole sequence. So every field that the transformers modelling code
of a supported family reads is either mapped onto the preset (and from there onto megatron-core's
``TransformerConfig`` / ``GPTModel``) or refused with its name and value; fields that modelling code
never reads are reported once as ignored.

Supported: ``mistral`` and ``llama`` decoders, whose RMSNorm, SwiGLU, bias-free projections and
absent q/k norms are fixed by the family (other families -- Qwen2's qkv biases, Qwen3's q/k norms,
Gemma's norms -- are refused by ``model_type``), and ``llava`` with a ``pixtral`` vision tower and
one of those decoders. Rope: ``default``, ``linear`` (megatron-core's
``seq_len_interpolation_factor``) and ``llama3`` (megatron-core's ``RotaryEmbedding._apply_scaling``);
other rope types (yarn, dynamic, longrope, ...) are refused.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_apriel.errors import InputError

TEXT_FAMILIES = ("mistral", "llama")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": "silu", "swish": "silu"}  # transformers' ACT2FN: "swish" is SiLU
VISION_ACTIVATIONS = ("silu", "gelu")  # what models/llava.py builds for the Pixtral MLP and projector
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# Fields of the config classes that only serve initialisation, caching, generation, classification
# heads or bookkeeping: the causal LM computes the same function whatever their value.
BOOKKEEPING = frozenset({
    "transformers_version", "architectures", "model_type", "_name_or_path", "dtype", "torch_dtype",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "initializer_range", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    # transformers 5 no longer reads it (the sliced-matmul emulation of Llama-2's TP is gone)
    "pretraining_tp",
    # a processor setting (image tokens per image in the prompt), not the model's
    "image_seq_length",
})
# Fields every family's text config is checked for.
TEXT_MAPPED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
               "rope_theta", "rope_scaling", "partial_rotary_factor", "hidden_act", "attention_dropout",
               "attention_bias", "mlp_bias", "sliding_window", "layer_types", "is_causal", "attention_chunk_size")
LLAVA_MAPPED = ("text_config", "vision_config", "image_token_index", "image_token_id", "projector_hidden_act",
                "vision_feature_layer", "vision_feature_select_strategy", "multimodal_projector_bias")
VISION_MAPPED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                 "num_channels", "image_size", "patch_size", "hidden_act", "attention_dropout", "rope_parameters",
                 "rope_theta")


class HFConfigError(InputError):
    """A config field whose value the megatron-core model cannot compute; the message names it."""


@dataclass
class CheckedConfig:
    """The preset fields of an HF config, and the fields it carries that no modelling code reads."""

    text: dict[str, Any]
    vision: Optional[dict[str, Any]] = None
    ignored: list[str] = field(default_factory=list)


def _refuse(where: str, name: str, value, why: str):
    raise HFConfigError(f"{where}{name}={value!r}: {why}")


def _class_defaults(cfg) -> dict[str, Any]:
    """Every field the config's own class defines (what its modelling code may read), at its default."""
    return type(cfg)().to_dict()


def _unknown(cfg, known: tuple[str, ...], where: str) -> list[str]:
    """Fields present in ``cfg`` that its class does not define: transformers never reads them."""
    defined = set(_class_defaults(cfg)) | set(known) | BOOKKEEPING
    return [f"{where}{k}" for k in sorted(cfg.to_dict()) if k not in defined]


def _check_unclassified(cfg, known: tuple[str, ...], where: str) -> None:
    """A field the class defines but this table does not classify (one a later transformers adds)
    may change the function: accept it only at the class default, the value the table was written
    against."""
    default = _class_defaults(cfg)
    for k, v in cfg.to_dict().items():
        if k in default and k not in known and k not in BOOKKEEPING and v != default[k]:
            _refuse(where, k, v, f"a {type(cfg).__name__} field this converter does not map; only its default "
                                 f"{default[k]!r} is accepted")


def _rope(cfg, where: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling of the preset) from transformers 5's ``rope_parameters``, or the
    ``rope_theta`` / ``rope_scaling`` attributes of older configs."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
    name = f"{where}rope_parameters."
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        _refuse(name, "partial_rotary_factor", partial, "only full rotary embeddings are mapped")
    theta = float(params["rope_theta"])
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        factor = params.get("factor")
        if factor is None or float(factor) <= 0:
            _refuse(name, "factor", factor, "linear rope scaling needs a positive factor")
        return theta, {"rope_type": "linear", "factor": float(factor)}
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_KEYS if params.get(k) is None]
        if missing:
            _refuse(name, missing[0], None, "llama3 rope scaling needs " + ", ".join(LLAMA3_KEYS))
        if float(params["high_freq_factor"]) <= float(params["low_freq_factor"]):
            _refuse(name, "high_freq_factor", params["high_freq_factor"], "must exceed low_freq_factor")
        scaling = {k: float(params[k]) for k in LLAMA3_KEYS}
        scaling["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
        return theta, {"rope_type": "llama3", **scaling}
    _refuse(name, "rope_type", rope_type, f"megatron-core's GPTModel rope cannot compute it "
                                          f"(mapped: {', '.join(ROPE_TYPES)})")


def check_text_config(text, where: str = "") -> tuple[dict[str, Any], list[str]]:
    """Preset fields of a Mistral/Llama text config, and the fields ignored; raises HFConfigError."""
    family = getattr(text, "model_type", None)
    if family not in TEXT_FAMILIES:
        _refuse(where, "model_type", family, f"only the {' and '.join(TEXT_FAMILIES)} decoder families are mapped "
                                             "(others differ in biases, norms or attention)")
    act = getattr(text, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        _refuse(where, "hidden_act", act, "the decoder MLP is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(text, flag, False):
            _refuse(where, flag, getattr(text, flag), "the Mistral tensor table has no bias tensors")
    if float(getattr(text, "attention_dropout", 0.0) or 0.0) != 0.0:
        _refuse(where, "attention_dropout", text.attention_dropout, "training uses no attention dropout")
    if getattr(text, "is_causal", True) is False:
        _refuse(where, "is_causal", False, "the decoder is causal")
    if getattr(text, "attention_chunk_size", None) is not None:
        _refuse(where, "attention_chunk_size", text.attention_chunk_size, "chunked attention is not mapped")
    window = getattr(text, "sliding_window", None) if family == "mistral" else None  # Llama never reads it
    if window is not None and int(window) < int(text.max_position_embeddings):
        _refuse(where, "sliding_window", window, "megatron-core's attention here is full causal attention; a window "
                                                 f"below max_position_embeddings={text.max_position_embeddings} "
                                                 "changes the function")
    layer_types = getattr(text, "layer_types", None)
    if layer_types and set(layer_types) != {"full_attention"}:
        _refuse(where, "layer_types", sorted(set(layer_types)), "only full_attention layers are mapped")
    _check_unclassified(text, TEXT_MAPPED, where)
    theta, scaling = _rope(text, where)
    heads = text.num_attention_heads
    fields = dict(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(text, "num_key_value_heads", None) or heads,
        kv_channels=getattr(text, "head_dim", None) or text.hidden_size // heads,
        ffn_hidden_size=text.intermediate_size,
        vocab_size=text.vocab_size,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_epsilon=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        untie_embeddings=not getattr(text, "tie_word_embeddings", False),
        bos_token_id=getattr(text, "bos_token_id", 1) or 1,
        eos_token_id=getattr(text, "eos_token_id", 2) or 2,
    )
    return fields, _unknown(text, TEXT_MAPPED, where)


def check_vision_config(cfg, where: str = "vision_config.") -> tuple[dict[str, Any], list[str]]:
    """VisionPreset fields of a Llava config's Pixtral tower and projector."""
    v = cfg.vision_config
    if getattr(v, "model_type", None) != "pixtral":
        _refuse(where, "model_type", getattr(v, "model_type", None), "only pixtral vision towers are mapped")
    if cfg.vision_feature_layer != -1:
        _refuse("", "vision_feature_layer", cfg.vision_feature_layer, "only Pixtral's last layer (-1) is mapped")
    if cfg.vision_feature_select_strategy != "full":
        _refuse("", "vision_feature_select_strategy", cfg.vision_feature_select_strategy, "only 'full' is mapped")
    if not getattr(cfg, "multimodal_projector_bias", True):
        _refuse("", "multimodal_projector_bias", False, "the projector table has biases")
    if cfg.projector_hidden_act not in VISION_ACTIVATIONS:
        _refuse("", "projector_hidden_act", cfg.projector_hidden_act, f"mapped: {', '.join(VISION_ACTIVATIONS)}")
    if v.hidden_act not in VISION_ACTIVATIONS:
        _refuse(where, "hidden_act", v.hidden_act, f"mapped: {', '.join(VISION_ACTIVATIONS)}")
    if float(getattr(v, "attention_dropout", 0.0) or 0.0) != 0.0:
        _refuse(where, "attention_dropout", v.attention_dropout, "training uses no attention dropout")
    head_dim = v.hidden_size // v.num_attention_heads
    if getattr(v, "head_dim", None) not in (None, head_dim):
        # Pixtral's attention splits hidden_size by heads while its rope uses head_dim
        _refuse(where, "head_dim", v.head_dim, f"Pixtral attention uses hidden_size / heads = {head_dim}")
    rope = dict(getattr(v, "rope_parameters", None) or {})
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        _refuse(where + "rope_parameters.", "rope_type", rope["rope_type"], "Pixtral's 2-D rope is axial")
    _check_unclassified(v, VISION_MAPPED, where)
    fields = dict(
        num_layers=v.num_hidden_layers, hidden_size=v.hidden_size, num_attention_heads=v.num_attention_heads,
        head_dim=head_dim, ffn_hidden_size=v.intermediate_size, patch_size=int(v.patch_size),
        image_size=int(v.image_size), rope_theta=float(rope.get("rope_theta", getattr(v, "rope_theta", 10000.0))),
        num_channels=v.num_channels, image_token_id=getattr(cfg, "image_token_index", None) or cfg.image_token_id,
        projector_hidden_act=cfg.projector_hidden_act, hidden_act=v.hidden_act,
    )
    return fields, _unknown(v, VISION_MAPPED, where)


def check_hf_config(cfg) -> CheckedConfig:
    """Check a transformers config (Mistral/Llama, or Llava with one as text_config)."""
    if getattr(cfg, "model_type", None) == "llava" or getattr(cfg, "vision_config", None) is not None:
        if getattr(cfg, "model_type", None) != "llava":
            _refuse("", "model_type", cfg.model_type, "the multimodal model mapped is llava (Pixtral)")
        text, ignored = check_text_config(cfg.text_config, "text_config.")
        # transformers keeps a Llava's tie_word_embeddings on the top-level config
        text["untie_embeddings"] = not (getattr(cfg, "tie_word_embeddings", False)
                                        or getattr(cfg.text_config, "tie_word_embeddings", False))
        vision, v_ignored = check_vision_config(cfg)
        _check_unclassified(cfg, LLAVA_MAPPED, "")
        return CheckedConfig(text, vision, ignored + v_ignored + _unknown(cfg, LLAVA_MAPPED, ""))
    text, ignored = check_text_config(cfg)
    return CheckedConfig(text, None, ignored)


def ignored_note(source: str, checked: CheckedConfig) -> Optional[str]:
    """The one line that lists the config fields no modelling code reads (None when there are none)."""
    if not checked.ignored:
        return None
    return f"{source}: ignored (transformers does not read them): {', '.join(checked.ignored)}"


def check_hf_dir(hf_dir, report: bool = True):
    """Load ``hf_dir/config.json`` with transformers and check it: ``(config, CheckedConfig)``.

    Every failure (missing or unparsable file, unknown model type, a refused field) is an
    ``HFConfigError`` whose message starts with the config's path. ``report`` prints the ignored
    fields once, to stderr.
    """
    # deferred: the preset table imports this module and model-info does not need transformers
    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFConfigError(f"{path}: missing (an HF checkpoint folder needs config.json)")
    try:
        json.loads(path.read_text())
        cfg = AutoConfig.from_pretrained(hf_dir)
    except (ValueError, KeyError, OSError) as e:  # bad JSON, a model_type transformers does not know
        raise HFConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    try:
        checked = check_hf_config(cfg)
    except HFConfigError as e:
        raise HFConfigError(f"{path}: {e}") from None
    note = ignored_note(str(path), checked)
    if report and note:
        print(note, file=sys.stderr, flush=True)
    return cfg, checked
