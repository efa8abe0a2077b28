"""Model presets: the architectures of RECIPE.md as data, plus tiny ones for tests and demos.

A preset is one dataclass that knows how to become a megatron-core ``TransformerConfig`` and a
Hugging Face config. Everything that builds or converts a model goes through a preset, so a
checkpoint's architecture is always named, printed and saved beside it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from megatron_apriel.models.hf_config import check_hf_config
from megatron_apriel.models.torch_fusions import install as install_torch_fusions


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Vocabulary rounded up the Megatron way, but independent of TP for TP <= divisible_by.

    Megatron-LM pads to a multiple of ``divisible_by * tp``, which makes the embedding shape (and so
    the checkpoint) depend on the TP size that saved it. Padding to ``lcm(divisible_by, tp)`` keeps
    every power-of-two TP up to 128 on the same shape, so dist checkpoints reshard freely.
    """
    multiple = math.lcm(divisible_by, tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass
class ImageLayout:
    """How images become pixels and tokens (Pixtral-12B's values by default): one image token per
    ``patch_size`` square, ``[IMG_BREAK]`` after each row of patches, ``[IMG_END]`` after the last.

    The one place the Pixtral geometry is written: :class:`VisionPreset` takes its defaults from
    :data:`PIXTRAL_LAYOUT`, ``apriel preprocess-multimodal`` its flags' defaults, and the image-text
    datasets store and read it (``data/multimodal_format.py``)."""

    patch_size: int = 16
    image_size: int = 1024  # longest edge after resize
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    @property
    def token_ids(self) -> set[int]:
        return {self.image_token_id, self.image_break_token_id, self.image_end_token_id}

    def image_tokens(self, height: int, width: int) -> np.ndarray:
        """The tokens of one resized image (PixtralProcessor.replace_image_token, as ids)."""
        rows, cols = height // self.patch_size, width // self.patch_size
        grid = np.full((rows, cols + 1), self.image_token_id, dtype=np.int64)
        grid[:, -1] = self.image_break_token_id
        out = grid.reshape(-1)
        out[-1] = self.image_end_token_id
        return out

    def processor(self):
        """transformers' PixtralImageProcessor with these settings (PIL backend when torchvision is absent)."""
        try:  # transformers imported here: reading the dataset format needs no image processor
            from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil as cls
        except ImportError:  # older transformers: the slow processor is the PIL one
            from transformers import PixtralImageProcessor as cls
        return cls(size={"longest_edge": self.image_size}, patch_size=self.patch_size,
                   image_mean=list(self.image_mean), image_std=list(self.image_std))


PIXTRAL_LAYOUT = ImageLayout()


@dataclass
class VisionPreset:
    """The Pixtral vision encoder and LLaVA projector (used by the multimodal presets)."""

    num_layers: int = 24
    hidden_size: int = 1024
    num_attention_heads: int = 16
    head_dim: int = 64
    ffn_hidden_size: int = 4096
    patch_size: int = PIXTRAL_LAYOUT.patch_size
    image_size: int = PIXTRAL_LAYOUT.image_size
    rope_theta: float = 10000.0
    num_channels: int = 3
    norm_epsilon: float = 1e-5
    image_token_id: int = PIXTRAL_LAYOUT.image_token_id
    image_break_token_id: int = PIXTRAL_LAYOUT.image_break_token_id
    image_end_token_id: int = PIXTRAL_LAYOUT.image_end_token_id
    projector_hidden_act: str = "gelu"
    hidden_act: str = "silu"  # the encoder's gated MLP (Pixtral-12B: silu)

    def image_layout(self) -> ImageLayout:
        """The layout of the images this encoder reads (normalisation: Pixtral's)."""
        return ImageLayout(patch_size=self.patch_size, image_size=self.image_size, image_token_id=self.image_token_id,
                           image_break_token_id=self.image_break_token_id, image_end_token_id=self.image_end_token_id)


@dataclass
class ModelPreset:
    """A Mistral-family decoder (RMSNorm, SwiGLU, rope, GQA, untied embeddings)."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # head_dim; 128 for Nemo although 5120 / 32 = 160
    ffn_hidden_size: int
    vocab_size: int
    rope_theta: float
    norm_epsilon: float = 1e-5
    # None, {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}: transformers' rope_parameters, as
    # models.hf_config maps them (the builder hands them to megatron-core's RotaryEmbedding)
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 1024000
    untie_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    hf_architecture: str = "MistralForCausalLM"
    vision: Optional[VisionPreset] = None
    description: str = ""

    def replace(self, **changes) -> "ModelPreset":
        return dataclasses.replace(self, **changes)

    def function_differences(self, other: "ModelPreset") -> list[str]:
        """``field: mine vs other`` for every field that changes what the model computes.

        Names, descriptions, the HF class, token ids and the context length transformers advertises
        leave the megatron-core model's function alone and are not compared.
        """
        skip = {"name", "description", "hf_architecture", "bos_token_id", "eos_token_id", "max_position_embeddings",
                "vision"}
        diffs = [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)]
        if self.vision != other.vision:
            diffs.append(f"vision: {self.vision!r} vs {other.vision!r}")
        return diffs

    # ------------------------------------------------------------------ megatron-core
    def transformer_config(
        self,
        tp: int = 1,
        pp: int = 1,
        vpp: Optional[int] = None,
        cp: int = 1,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        bf16: bool = False,
        fp8: Optional[str] = None,
        fp8_recipe: str = "delayed",
        recompute: str = "none",
        recompute_num_layers: int = 1,
        device: str = "cpu",
        use_te: bool = False,
        torch_fusions: Iterable[str] = (),
        **overrides: Any,
    ):
        """The megatron-core ``TransformerConfig`` of this preset at a parallel layout.

        ``recompute``: ``none``, ``selective`` (core attention) or ``full`` (every layer, uniform).
        CUDA fusions are enabled on the GPU only (rope fusion only with Transformer Engine).
        ``calculate_per_token_loss`` is on: the loss is averaged over tokens, not micro-batches.
        ``torch_fusions`` (CUDA, local spec): the stand-ins of ``models.torch_fusions`` to install;
        ``wgrad`` turns on gradient-accumulation fusion, so the model must be trained through
        megatron-core's DistributedDataParallel (its ``main_grad`` buffers).
        """
        # megatron-core (4-5 s to import) only here: model-info and grpo-info read presets without it
        from megatron.core.transformer.transformer_config import TransformerConfig

        if recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
        gpu_te = device == "cuda" and use_te
        fused = install_torch_fusions(torch_fusions, device) if not gpu_te else ()
        kwargs = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=0.02,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if (vpp or 1) > 1 else None,
            context_parallel_size=cp,
            sequence_parallel=sequence_parallel and tp > 1,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=bf16,
            use_cpu_initialization=device == "cpu",
            gradient_accumulation_fusion="wgrad" in fused,
            # SwiGLU and bias-dropout-add fusions are megatron-core's torch.compile kernels: they
            # need CUDA, not Transformer Engine (rope fusion does need TE).
            bias_activation_fusion=device == "cuda",
            bias_dropout_fusion=device == "cuda",
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=gpu_te,
            cross_entropy_loss_fusion=device == "cuda",
            cross_entropy_fusion_impl="native",
            deallocate_pipeline_outputs=True,
            # gloo runs a "batched" isend/irecv as separate messages; with PP=2 both directions go to
            # the same peer and get mixed up (wrong activations under interleaving). Batch on NCCL only.
            batch_p2p_comm=device == "cuda",
            # The loss of a step is the mean over every loss-bearing token of the global batch, so
            # TP/PP/DP layouts and micro-batch splits all give the same gradient.
            calculate_per_token_loss=True,
        )
        if fp8:
            kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe, fp8_amax_history_len=1024 if fp8_recipe == "delayed" else 1,
                          fp8_amax_compute_algo="max" if fp8_recipe == "delayed" else "most_recent")
        if recompute == "selective":
            kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
        elif recompute == "full":
            kwargs.update(
                recompute_granularity="full",
                recompute_method="uniform",
                recompute_num_layers=recompute_num_layers,
            )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    # ------------------------------------------------------------------ Hugging Face
    def hf_config(self, **overrides):
        """The transformers config (MistralConfig) of this decoder."""
        from transformers import MistralConfig  # deferred: presets are read by light verbs (model-info)

        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.kv_channels,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_epsilon,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})},
            tie_word_embeddings=not self.untie_embeddings,
            sliding_window=None,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            attention_dropout=0.0,
        )
        kwargs.update(overrides)
        cfg = MistralConfig(**kwargs)
        cfg.architectures = ["MistralForCausalLM"]
        return cfg

    @classmethod
    def from_hf_config(cls, cfg, name: str = "from-hf") -> "ModelPreset":
        """The decoder preset of a transformers Mistral/Llama config (or of a Llava's text_config).

        Every field that changes the function is mapped or refused (:mod:`models.hf_config`,
        which raises ``HFConfigError`` naming the field and its value).
        """
        checked = check_hf_config(cfg)
        return cls(name=name, hf_architecture=(getattr(cfg, "architectures", None) or ["MistralForCausalLM"])[0],
                   **checked.text)

    # ------------------------------------------------------------------ counting
    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts, computed from the shapes (no allocation).

        ``total`` is the whole model that is built and trained: the decoder plus, for the
        multimodal presets, the Pixtral vision encoder and the 2-layer projector (which megatron-core
        places on the first pipeline stage). ``decoder`` is the text model alone.
        """
        h, d = self.hidden_size, self.kv_channels
        q = self.num_attention_heads * d
        kv = self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h
        mlp = 3 * h * self.ffn_hidden_size
        norms = 2 * h
        per_layer = attn + mlp + norms
        embedding = self.vocab_size * h
        output = self.vocab_size * h if self.untie_embeddings else 0
        decoder = embedding + output + self.num_layers * per_layer + h
        vision = projector = 0
        if self.vision is not None:
            v = self.vision
            vq = v.num_attention_heads * v.head_dim
            v_layer = (3 * v.hidden_size * vq + vq * v.hidden_size  # q, k, v, o
                       + 3 * v.hidden_size * v.ffn_hidden_size + 2 * v.hidden_size)  # gate, up, down; two norms
            vision = v.num_channels * v.patch_size**2 * v.hidden_size + v.hidden_size + v.num_layers * v_layer
            projector = (v.hidden_size + 1) * h + (h + 1) * h  # linear_1 and linear_2, with biases
        return {
            "total": decoder + vision + projector,
            "decoder": decoder,
            "vision_encoder": vision,
            "projector": projector,
            "embedding": embedding,
            "output_layer": output,
            "per_layer": per_layer,
            "per_layer_attention": attn,
            "per_layer_mlp": mlp,
            "final_norm": h,
        }


_NEMO = dict(
    hidden_size=5120,
    num_attention_heads=32,
    num_query_groups=8,
    kv_channels=128,
    ffn_hidden_size=14336,
    vocab_size=131072,
    norm_epsilon=1e-5,
    max_position_embeddings=1024000,
)

# Tiny decoders keep the properties the real ones have and that layout bugs hide behind:
# head_dim * heads != hidden, GQA, untied embeddings, TP=2-divisible heads and groups.
_TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=32,
    ffn_hidden_size=192,
    vocab_size=512,
    norm_epsilon=1e-5,
    max_position_embeddings=4096,
)

# Head dim 16 (hidden / heads, as Pixtral ties them) keeps the 2-D rope's four frequency bands distinct.
_TINY_VISION = VisionPreset(num_layers=2, hidden_size=32, num_attention_heads=2, head_dim=16, ffn_hidden_size=64,
                            patch_size=4, image_size=64)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset(
            name="mistral-nemo-12b",
            num_layers=40,
            rope_theta=1e6,
            description="Mistral-Nemo-Base-2407, the base of Apriel-Nemotron",
            **_NEMO,
        ),
        ModelPreset(
            name="apriel-nemotron-15b",
            num_layers=50,
            rope_theta=1e6,
            description="Mistral-Nemo depth-upscaled 40 -> 50 layers",
            **_NEMO,
        ),
        ModelPreset(
            name="pixtral-12b",
            num_layers=40,
            rope_theta=1e9,
            hf_architecture="LlavaForConditionalGeneration",
            vision=VisionPreset(),
            description="Pixtral-12B-Base-2409: vision encoder, projector and decoder",
            **_NEMO,
        ),
        ModelPreset(
            name="apriel-1.5-15b",
            num_layers=48,
            rope_theta=1e9,
            hf_architecture="LlavaForConditionalGeneration",
            vision=VisionPreset(),
            description="Apriel-1.5-15B: Pixtral with the decoder depth-upscaled 40 -> 48",
            **_NEMO,
        ),
        ModelPreset(
            name="tiny-llava",
            num_layers=4,
            rope_theta=1e6,
            hf_architecture="LlavaForConditionalGeneration",
            vision=_TINY_VISION,
            description="tiny decoder + 2-layer Pixtral encoder (patch 4)",
            **_TINY,
        ),
        ModelPreset(
            name="tiny-llava-upscaled",
            num_layers=5,
            rope_theta=1e6,
            hf_architecture="LlavaForConditionalGeneration",
            vision=_TINY_VISION,
            description="tiny-llava with the decoder upscaled 4 -> 5 (the 40 -> 48 plan scaled down)",
            **_TINY,
        ),
        ModelPreset(name="tiny", num_layers=4, rope_theta=1e6, description="4-layer test model", **_TINY),
        ModelPreset(
            name="tiny-upscaled",
            num_layers=5,
            rope_theta=1e6,
            description="tiny upscaled 4 -> 5 (the 40 -> 50 plan scaled down)",
            **_TINY,
        ),
    ]
}


def get_preset(name: str, **changes) -> ModelPreset:
    """A preset by name, optionally with fields replaced (``get_preset("tiny", num_layers=2)``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    return preset.replace(**changes) if changes else preset
