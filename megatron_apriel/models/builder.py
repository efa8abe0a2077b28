"""Build megatron-core GPTModels from presets.

The layer spec is chosen once, here: Transformer Engine's spec when TE imports and CUDA is present,
otherwise megatron-core's local spec with its core attention swapped for :class:`SDPAttention`
(a ModuleSpec substitution, so the model class is megatron-core's own).
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_apriel.models import float8, float8_linear
from megatron_apriel.models.presets import ModelPreset, padded_vocab_size
from megatron_apriel.models.sdpa_attention import SDPAttention


def te_available() -> bool:
    try:  # Transformer Engine is an optional GPU-only extra
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def check_fp8(fp8, device: str) -> str:
    """Fail at start, with the reason, when FP8 is asked for but cannot run (``models.float8.check``);
    returns the value as one of ``float8.CHOICES`` (ValueError names the reason, the caller the key)."""
    return float8.check(fp8, device, te_available() if device == "cuda" else False)


def float8_layers(config, fp8: str, bf16_first: int = 0, bf16_last: int = 0) -> tuple[int, ...]:
    """The global layer numbers (0-based) whose linears run in float8: all but the first
    ``bf16_first`` and the last ``bf16_last`` (Megatron-LM's ``--first-last-layers-bf16``)."""
    if float8.torchao_recipe(fp8) is None:
        return ()
    return tuple(range(bf16_first, config.num_layers - bf16_last))


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


def layer_spec(use_te: bool, float8_recipe: Optional[str] = None, float8_emulate: bool = False):
    """The transformer layer ModuleSpec: TE's, or local with SDPA core attention (and SP-capable norms),
    its linears in float8 through torchao when ``float8_recipe`` (``tensorwise`` / ``rowwise``) is set."""
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.input_layernorm = SequenceParallelTorchNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    if float8_recipe:
        float8_linear.apply_to_layer_spec(spec, float8_recipe, float8_emulate)
    return spec


def decoder_spec(config, use_te: bool, vp_stage: Optional[int] = None, fp8=None, fp8_layers: tuple[int, ...] = ()):
    """The decoder block of this rank: the layer spec per layer, and for the local spec the final
    norm as :class:`SequenceParallelTorchNorm` (megatron-core would pick ``WrappedTorchNorm``).

    ``fp8`` (a torchao ``model.fp8`` value) puts the linears of the global layers ``fp8_layers`` in
    float8, emulated off CUDA."""
    if use_te:
        return layer_spec(True)
    recipe = float8.torchao_recipe(fp8)
    offset = get_transformer_layer_offset(config, vp_stage)
    emulate = config.use_cpu_initialization  # the CPU backend: no float8 GEMM unit
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(False, recipe if offset + i in fp8_layers else None, emulate)
                     for i in range(get_num_layers_to_build(config, vp_stage))],
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
    fp8=None,
    fp8_layers: tuple[int, ...] = (),
):
    """One GPTModel chunk for this rank's pipeline stage (and virtual stage ``vp_stage``); ``fp8`` /
    ``fp8_layers`` as :func:`decoder_spec`."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    scaling = preset.rope_scaling or {}
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(config, use_te, vp_stage, fp8, fp8_layers),
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


def build_model_chunks(preset: ModelPreset, config, use_te: bool = False, max_sequence_length: int = 4096,
                       fp8=None, fp8_layers: Optional[tuple[int, ...]] = None):
    """All model chunks of this rank: one, or one per virtual pipeline stage. ``fp8``: a torchao
    ``model.fp8`` recipe for the linears of ``fp8_layers`` (default: every layer)."""
    if fp8_layers is None:
        fp8_layers = float8_layers(config, fp8)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None or vpp == 1 else range(vpp)
    return [build_gpt_model(preset, config, use_te, vp_stage=i, max_sequence_length=max_sequence_length, fp8=fp8,
                            fp8_layers=fp8_layers) for i in stages]
