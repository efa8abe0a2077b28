"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local spec uses ``DotProductAttention``: an explicit [b, np, s, s] score matrix,
no packed sequences, and a causal mask that it creates on the CUDA device. Without Transformer
Engine that is both slow and memory hungry on a GPU. This module has the same constructor and
forward signature and is swapped in through the layer ModuleSpec (never by subclassing the model),
so a GPU without TE still gets flash / memory-efficient attention and the CPU path needs no
explicit mask.

It supports the two layouts megatron-core's ``SelfAttention`` hands to core attention:

* ``sbhd``: query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np*hn];
* ``thd`` (packed sequences, ``packed_seq_params.qkv_format == "thd"``): [t, np, hn] with
  ``cu_seqlens``; each document attends only to itself, causally (rotary positions are restarted
  per document by megatron-core before this point).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in replacement for megatron-core's DotProductAttention backed by torch SDPA."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "context parallelism needs Transformer Engine attention; the SDPA path supports cp=1"
            )
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is not supported by the SDPA path")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q, k, v, mask, causal):
        # q: [b, np, sq, hn]; k, v: [b, ng, sk, hn]
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=self.heads_per_partition != self.groups_per_partition,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the SDPA path")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal

        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params, causal)

        # A causal layer ignores any mask it is handed: is_causal lets SDPA pick the flash kernel.
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask.bool()  # megatron masks mark positions to drop with True
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        out = self._sdpa(q, k, v, mask, causal)  # [b, np, sq, hn]
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _forward_thd(self, query, key, value, params: PackedSeqParams, causal: bool):
        # query [t, np, hn]. One SDPA call per document keeps every kernel dense and exact; the
        # cu_seqlens boundaries are the only place attention is cut.
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        cu_q = cu_q.tolist()
        cu_k = cu_k.tolist()
        out = torch.zeros(
            query.shape[0], query.shape[1] * query.shape[2], dtype=query.dtype, device=query.device
        )
        for i in range(len(cu_q) - 1):
            qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
            if qe <= qs:
                continue
            q = query[qs:qe].permute(1, 0, 2).unsqueeze(0)
            k = key[ks:ke].permute(1, 0, 2).unsqueeze(0)
            v = value[ks:ke].permute(1, 0, 2).unsqueeze(0)
            o = self._sdpa(q, k, v, None, causal)  # [1, np, s, hn]
            out[qs:qe] = o.squeeze(0).permute(1, 0, 2).reshape(qe - qs, -1)
        return out
