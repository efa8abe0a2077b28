"""The Pixtral/LLaVA multimodal model (Pixtral-12B, Apriel-1.5) composed from megatron-core parts.

Why not megatron-core's ``LLaVAModel``: its vision towers (CLIP, SigLIP, InternViT, RADIO) take
fixed-size images with learned absolute position embeddings and a fixed number of image tokens per
tile, and it inserts the image tokens itself. Pixtral needs what it cannot host: variable image
sizes, a 2-D rotary embedding per patch, block-diagonal attention between the images of one
sequence, and the ``[IMG_BREAK]``/``[IMG_END]`` layout that the processor writes into the text. So the
model is composed from the same megatron-core pieces ``LLaVAModel`` uses:

* ``vision_model``: :class:`PixtralVisionEncoder` -- a patch ``Conv2d`` and RMSNorm (``ln_pre``), then
  a megatron-core ``TransformerBlock`` built from the local GPT layer spec (RMSNorm, gated MLP, no
  bias) with non-causal SDPA core attention. The 2-D rope reaches megatron-core attention as an
  ordinary ``rotary_pos_emb`` freqs tensor ``[patches, 1, 1, head_dim]`` (same rotate-half convention
  as HF's ``PixtralVisionRotaryEmbedding``); images are concatenated into one sequence with a
  block-diagonal mask, exactly as HF does without flash attention.
* ``vision_projection``: megatron-core ``MultimodalProjector`` ("mlp": Linear + GELU + Linear, biases).
* ``language_model``: the GPTModel of :mod:`megatron_apriel.models.builder` (any TP/PP/VPP).

Checkpoint keys: the language model's dist-checkpoint keys carry *no* ``language_model.`` prefix,
so a multimodal checkpoint's decoder is read by every text tool (conversion reader, averaging,
weights-only load of a text checkpoint into the decoder) unchanged; vision keys start with
``vision_model.`` and ``vision_projection.``. The vision encoder and projector live on the first
pipeline stage only.

BATCH CONTRACT (shared with ``megatron_apriel/data/multimodal.py``): a batch is the text dict
(``tokens``, ``labels``, ``loss_mask``, ``position_ids``: [b, s]) plus ``pixel_values``: float32
[N, 3, H, W] (the micro-batch's images in the order their placeholders appear, row 0 first,
normalised like HF PixtralImageProcessor, zero-padded to the largest H, W) and ``image_sizes``: int64
[N, 2] (real height, width in pixels, multiples of ``patch_size``). N may be 0 (keys absent or
empty). The tokens hold the expanded placeholders as HF's PixtralProcessor writes them: per image,
for each patch row, ``image_token_id`` x (width / patch) then ``image_break_token_id``, the last row
ending in ``image_end_token_id`` instead. The embeddings at ``image_token_id`` positions are replaced
by the projected patch features in order (as HF ``LlavaForConditionalGeneration`` does).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_apriel.models.builder import build_gpt_model
from megatron_apriel.models.presets import ModelPreset, VisionPreset
from megatron_apriel.models.sdpa_attention import SDPAttention

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (known: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def vision_head_dim(vision: VisionPreset) -> int:
    """Pixtral attention uses hidden / heads whatever ``head_dim`` says; refuse a preset that disagrees."""
    d = vision.hidden_size // vision.num_attention_heads
    if vision.head_dim != d:
        raise ValueError(f"vision head_dim {vision.head_dim} != hidden_size / heads = {d} (Pixtral ties them)")
    return d


def _device_of(config) -> str:
    return "cpu" if config.use_cpu_initialization else "cuda"


def vision_layers_preset(vision: VisionPreset) -> ModelPreset:
    """The encoder's layers as a decoder-like preset (MHA: one query group per head)."""
    return ModelPreset(
        name="pixtral-vision", num_layers=vision.num_layers, hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_attention_heads, num_query_groups=vision.num_attention_heads,
        kv_channels=vision_head_dim(vision), ffn_hidden_size=vision.ffn_hidden_size, vocab_size=1,
        rope_theta=vision.rope_theta, norm_epsilon=vision.norm_epsilon,
    )


def vision_transformer_config(vision: VisionPreset, config):
    """The encoder's TransformerConfig: the decoder's TP and dtype, never pipelined, local attention."""
    return vision_layers_preset(vision).transformer_config(
        tp=config.tensor_model_parallel_size, pp=1, params_dtype=config.params_dtype, bf16=config.bf16,
        device=_device_of(config), use_te=False, activation_func=_activation(vision.hidden_act),
        apply_rope_fusion=False, perform_initialization=config.perform_initialization,
    )


def projector_config(vision: VisionPreset, preset: ModelPreset, config):
    """Linear(vision -> text) + GELU + Linear(text -> text), with biases.

    The fused bias-GELU kernel of megatron-core is the tanh approximation; HF's "gelu" is exact, so
    the fusion stays off here (the projector is a negligible part of the step).
    """
    return dataclass_replace(
        vision_transformer_config(vision, config), num_layers=1, hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.hidden_size, gated_linear_unit=False, add_bias_linear=True,
        activation_func=_activation(vision.projector_hidden_act),
        bias_activation_fusion=False, tensor_model_parallel_size=config.tensor_model_parallel_size,
    )


def dataclass_replace(config, **changes):
    return dataclasses.replace(config, **changes)


def pixtral_rope_freqs(grids: list[tuple[int, int]], head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Rotary angles [patches, 1, 1, head_dim] of HF's axial 2-D rope for patch grids (rows, cols).

    Even-indexed base frequencies rotate with the row, odd-indexed ones with the column; the half is
    repeated so megatron-core's rotate-half ``apply_rotary_pos_emb`` reproduces HF's cos/sin layout.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    inv_h, inv_w = inv[0::2], inv[1::2]
    parts = []
    for gh, gw in grids:
        h, w = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
        parts.append(torch.cat([h.reshape(-1, 1).float() * inv_h, w.reshape(-1, 1).float() * inv_w], dim=-1))
    angles = torch.cat(parts, dim=0)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def vision_layer_spec():
    """The local GPT layer spec with non-causal SDPA core attention (a spec substitution)."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.self_attention.params = {**spec.submodules.self_attention.params,
                                             "attn_mask_type": AttnMaskType.no_mask}
    return spec


class PixtralVisionEncoder(torch.nn.Module):
    """Patch conv + ln_pre + megatron-core TransformerBlock; images of any size, one sequence."""

    def __init__(self, vision: VisionPreset, config):
        super().__init__()
        self.vision, self.config = vision, config
        self.head_dim = vision_head_dim(vision)
        self.patch_conv = torch.nn.Conv2d(vision.num_channels, vision.hidden_size, kernel_size=vision.patch_size,
                                          stride=vision.patch_size, bias=False, dtype=config.params_dtype)
        self.ln_pre = torch.nn.RMSNorm(vision.hidden_size, eps=vision.norm_epsilon, dtype=config.params_dtype)
        self.transformer = TransformerBlock(config, vision_layer_spec(), post_layer_norm=False,
                                            pre_process=True, post_process=False)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Patch features [sum of patches, hidden] of every image, image by image, row-major."""
        p = self.vision.patch_size
        patches = self.patch_conv(pixel_values.to(self.patch_conv.weight.dtype))
        grids = [(int(h) // p, int(w) // p) for h, w in image_sizes.tolist()]
        seq = torch.cat([emb[:, :gh, :gw].flatten(1).T for emb, (gh, gw) in zip(patches, grids)], dim=0)
        seq = self.ln_pre(seq).unsqueeze(1)  # [s, 1, h]
        freqs = pixtral_rope_freqs(grids, self.head_dim, self.vision.rope_theta, device=seq.device)
        mask = None
        if len(grids) > 1:  # megatron convention: True = masked out
            ids = torch.repeat_interleave(torch.arange(len(grids), device=seq.device),
                                          torch.tensor([gh * gw for gh, gw in grids], device=seq.device))
            mask = (ids[:, None] != ids[None, :])[None, None]
        out = self.transformer(hidden_states=seq, attention_mask=mask, rotary_pos_emb=freqs)
        return out[:, 0]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        # patch_conv and ln_pre are plain torch modules replicated over TP: the TP group must be
        # named, else every TP rank claims replica 0 of them.
        tp_group = parallel_state.get_tensor_model_parallel_group()
        sd = {}
        for name, module in self.named_children():
            sd.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                 tp_group=tp_group))
        return sd


class LlavaModel(MegatronModule):
    """Pixtral vision encoder + projector + GPTModel decoder; ``forward`` as GPTModel's plus images."""

    def __init__(self, preset: ModelPreset, config, use_te: bool = False, pre_process: Optional[bool] = None,
                 post_process: Optional[bool] = None, vp_stage: Optional[int] = None, max_sequence_length: int = 4096):

        super().__init__(config=config)
        if preset.vision is None:
            raise ValueError(f"preset {preset.name} has no vision encoder")
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        self.preset, self.vision = preset, preset.vision
        self.pre_process = pre_process
        self.language_model = build_gpt_model(preset, config, use_te, pre_process=pre_process,
                                              post_process=post_process, vp_stage=vp_stage,
                                              max_sequence_length=max_sequence_length)
        self.post_process = self.language_model.post_process
        self.model_type = self.language_model.model_type  # read by megatron-core's schedules
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights
        self.vision_model = self.vision_projection = None
        if pre_process:
            # Image features replace token embeddings before the sequence-parallel scatter, so the
            # embedding returns the full sequence and the scatter happens here after the merge.
            emb = self.language_model.embedding
            emb.scatter_to_sequence_parallel = False
            emb.reduce_scatter_embeddings = False
            emb.word_embeddings.reduce_scatter_embeddings = False
            self.vision_model = PixtralVisionEncoder(self.vision, vision_transformer_config(self.vision, config))
            self.vision_projection = MultimodalProjector(
                projector_config(self.vision, preset, config),
                MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                projector_type="mlp", input_size=self.vision.hidden_size)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Projected features [sum of patches, text hidden] of a micro-batch's images."""
        feats = self.vision_model(pixel_values, image_sizes)
        return self.vision_projection(feats)

    def embed(self, input_ids, position_ids, pixel_values=None, image_sizes=None) -> torch.Tensor:
        """Decoder input [s, b, h]: token embeddings with image features at the image-token positions."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            if image_sizes is None:
                raise ValueError("pixel_values given without image_sizes")
            feats = self.image_features(pixel_values, image_sizes)
            where = input_ids == self.vision.image_token_id  # [b, s]
            n = int(where.sum())
            if n != feats.shape[0]:
                raise ValueError(f"{n} image tokens in the batch but the images give {feats.shape[0]} patches "
                                 f"(image_sizes {image_sizes.tolist()}, patch {self.vision.patch_size})")
            # Row-major over [b, s], like HF's masked_scatter.
            emb = emb.transpose(0, 1).masked_scatter(where.unsqueeze(-1), feats.to(emb.dtype)).transpose(0, 1)
            emb = emb.contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb).clone()
        return emb

    def forward(self, input_ids, position_ids, attention_mask, labels=None, pixel_values=None, image_sizes=None,
                packed_seq_params=None, **kwargs):
        decoder_input = self.embed(input_ids, position_ids, pixel_values, image_sizes) if self.pre_process else None
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, packed_seq_params=packed_seq_params, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Decoder keys as a text GPTModel's (no ``language_model.`` in the checkpoint), vision keys prefixed."""
        sd = {f"{prefix}language_model.{k}": v
              for k, v in self.language_model.sharded_state_dict(prefix, sharded_offsets, metadata).items()}
        if self.pre_process:
            sd.update(self.vision_model.sharded_state_dict(f"{prefix}vision_model.", sharded_offsets, metadata))
            sd.update(self.vision_projection.sharded_state_dict(f"{prefix}vision_projection.", sharded_offsets,
                                                                metadata))
        return sd


def build_llava_chunks(preset: ModelPreset, config, use_te: bool = False, max_sequence_length: int = 4096):
    """All LlavaModel chunks of this rank (one per virtual pipeline stage), like ``build_model_chunks``."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None or vpp == 1:
        return [LlavaModel(preset, config, use_te, max_sequence_length=max_sequence_length)]
    return [LlavaModel(preset, config, use_te, vp_stage=i, max_sequence_length=max_sequence_length)
            for i in range(vpp)]
