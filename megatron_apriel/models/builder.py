"""Build megatron-core GPTModels from presets.

The layer spec is chosen once, here: Transformer Engine's spec when TE imports and CUDA is present,
otherwise megatron-core's local spec with its core attention swapped for :class:`SDPAttention`
(a ModuleSpec substitution, so the model class is megatron-core's own).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_apriel.models.presets import ModelPreset, padded_vocab_size
from megatron_apriel.models.sdpa_attention import SDPAttention


def te_available() -> bool:
    try:  # Transformer Engine is an optional GPU-only extra
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def check_fp8(fp8: Optional[str], device: str) -> None:
    """Fail at start, with the reason, when FP8 is asked for but cannot run."""
    if not fp8:
        return
    if fp8 not in ("hybrid", "e4m3"):
        raise ValueError(f"fp8 must be 'hybrid' or 'e4m3', got {fp8!r}")
    if device != "cuda":
        raise RuntimeError("FP8 training needs a CUDA GPU; this run is on the CPU")
    if not te_available():
        raise RuntimeError(
            "FP8 training needs Transformer Engine: pip install -e '.[gpu]' (transformer-engine[pytorch])"
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise RuntimeError(
            f"FP8 needs compute capability >= 8.9 (Ada/Hopper or newer); this GPU is {major}.{minor}"
        )


class SequenceParallelTorchNorm:
    """megatron-core's ``WrappedTorchNorm`` (torch RMSNorm/LayerNorm), usable under sequence parallelism.

    ``WrappedTorchNorm`` refuses SP because it does not flag its weights: under SP each TP rank
    normalises its own slice of the sequence, so a norm weight's gradient is a partial sum that
    megatron-core's ``finalize_model_grads`` all-reduces over TP for every parameter flagged
    ``sequence_parallel``, as Transformer Engine's and apex's norms are. This builds the same torch
    module and sets that flag, so the local spec (CPU, or a GPU without TE) runs the layouts the
    recipe's configs use (TP=8 with SP). Without SP it is ``WrappedTorchNorm`` unchanged.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def layer_spec(use_te: bool):
    """The transformer layer ModuleSpec: TE's, or local with SDPA core attention (and SP-capable norms)."""
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.input_layernorm = SequenceParallelTorchNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return spec


def decoder_spec(config, use_te: bool, vp_stage: Optional[int] = None):
    """The decoder block of this rank: the layer spec per layer, and for the local spec the final
    norm as :class:`SequenceParallelTorchNorm` (megatron-core would pick ``WrappedTorchNorm``)."""
    if use_te:
        return layer_spec(True)

    return TransformerBlockSubmodules(layer_specs=[layer_spec(False)] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=SequenceParallelTorchNorm)


def should_use_te(device: str, requested: Optional[bool] = None) -> bool:
    """TE when on CUDA and importable, unless the caller says otherwise."""
    available = device == "cuda" and te_available()
    if requested is None:
        return available
    if requested and not available:
        raise RuntimeError("use_te=True but Transformer Engine or CUDA is not available")
    return requested


def build_gpt_model(
    preset: ModelPreset,
    config,
    use_te: bool = False,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    max_sequence_length: int = 4096,
):
    """One GPTModel chunk for this rank's pipeline stage (and virtual stage ``vp_stage``)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    scaling = preset.rope_scaling or {}
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(config, use_te, vp_stage),
        vocab_size=padded_vocab_size(preset.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not preset.untie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(preset.rope_theta) if float(preset.rope_theta).is_integer() else preset.rope_theta,
        seq_len_interpolation_factor=scaling["factor"] if scaling.get("rope_type") == "linear" else None,
        vp_stage=vp_stage,
    )
    if scaling.get("rope_type") == "llama3":
        apply_llama3_rope_scaling(model.rotary_pos_emb, scaling)
    return model


def apply_llama3_rope_scaling(rotary, scaling: dict) -> None:
    """Llama-3 rope scaling with the checkpoint's own parameters, by megatron-core's function.

    ``GPTModel(rope_scaling=True)`` forwards only the factor to ``RotaryEmbedding._apply_scaling``,
    whose low/high frequency factors and original context default to Llama-3.1's (1, 4, 8192);
    calling that same function on the unscaled frequencies with every parameter of the config keeps
    other Llama-3 style checkpoints exact too.
    """
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"],
        original_max_position_embeddings=scaling["original_max_position_embeddings"])


def build_model_chunks(preset: ModelPreset, config, use_te: bool = False, max_sequence_length: int = 4096):
    """All model chunks of this rank: one, or one per virtual pipeline stage."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None or vpp == 1:
        return [build_gpt_model(preset, config, use_te, max_sequence_length=max_sequence_length)]
    return [
        build_gpt_model(preset, config, use_te, vp_stage=i, max_sequence_length=max_sequence_length)
        for i in range(vpp)
    ]
