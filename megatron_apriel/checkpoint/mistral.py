"""The HF MistralForCausalLM <-> megatron-core GPTModel mapping: one explicit table.

Names on the megatron side are *canonical*: those of a TP=1, PP=1 model built with the local spec,
with global layer indices, and full (unsharded) tensors. The same canonical form is what
dist_checkpointing stores, so conversion, averaging and loading all speak it.

Layouts that differ from HF (checked against transformers, see tests/test_parity.py):

* ``linear_qkv``: for each KV group g, [q rows of the heads of g; k rows of g; v rows of g],
  stacked over groups. A contiguous TP shard of this tensor is exactly the rows of that rank's
  groups, so TP slicing is a plain ``chunk`` on dim 0.
* ``linear_fc1`` = cat(gate_proj, up_proj). A TP shard is [gate_shard; up_shard], not a chunk.
* ``input_layernorm`` / ``pre_mlp_layernorm`` = HF ``input_layernorm`` / ``post_attention_layernorm``.
* embeddings and output layer are padded with zero rows to the padded vocabulary inside the model.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from megatron_apriel.models.presets import ModelPreset, padded_vocab_size

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
GLOBAL_COPY = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}

# TP layout of each canonical tensor: dim split across ranks, or None when replicated.
TP_DIM = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "decoder.final_layernorm.weight": None,
    "input_layernorm.weight": None,
    "pre_mlp_layernorm.weight": None,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,  # gated: each half chunked separately, see shard_tp
    "mlp.linear_fc2.weight": 1,
}


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset: ModelPreset) -> torch.Tensor:
    heads, groups, d = preset.num_attention_heads, preset.num_query_groups, preset.kv_channels
    per_group = heads // groups
    h = q.shape[-1]
    q = q.reshape(groups, per_group * d, h)
    k = k.reshape(groups, d, h)
    v = v.reshape(groups, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def unpack_qkv(qkv: torch.Tensor, preset: ModelPreset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, groups, d = preset.num_attention_heads, preset.num_query_groups, preset.kv_channels
    per_group = heads // groups
    h = qkv.shape[-1]
    qkv = qkv.reshape(groups, (per_group + 2) * d, h)
    q, k, v = torch.split(qkv, [per_group * d, d, d], dim=1)
    return q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()


def _layer_names(i: int, prefix: str = "model.layers") -> tuple[str, str]:
    return f"decoder.layers.{i}.", f"{prefix}.{i}."


def hf_names(preset: ModelPreset, hf_prefix: str = "model", lm_head: str = "lm_head.weight") -> list[str]:
    """Every HF tensor name a checkpoint of this preset must contain."""
    names = [f"{hf_prefix}.embed_tokens.weight", f"{hf_prefix}.norm.weight"]
    if preset.untie_embeddings:
        names.append(lm_head)
    for i in range(preset.num_layers):
        _, hf = _layer_names(i, f"{hf_prefix}.layers")
        names += [hf + s for s in LAYER_COPY.values()]
        for parts in LAYER_FUSED.values():
            names += [hf + s for s in parts]
    return names


def hf_to_mcore(
    get: Callable[[str], torch.Tensor],
    preset: ModelPreset,
    hf_prefix: str = "model",
    lm_head: str = "lm_head.weight",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical megatron name, tensor) pairs, reading HF tensors through ``get``.

    ``get`` is called once per HF tensor, in an order that lets the caller stream from safetensors
    (a few tensors alive at a time). ``hf_prefix`` is ``model`` for MistralForCausalLM and
    ``language_model.model`` for the on-disk Pixtral/Llava layout.
    """
    yield "embedding.word_embeddings.weight", get(f"{hf_prefix}.embed_tokens.weight")
    for i in range(preset.num_layers):
        mc, hf = _layer_names(i, f"{hf_prefix}.layers")
        for mc_suffix, hf_suffix in LAYER_COPY.items():
            yield mc + mc_suffix, get(hf + hf_suffix)
        q, k, v = (get(hf + s) for s in LAYER_FUSED["self_attention.linear_qkv.weight"])
        yield mc + "self_attention.linear_qkv.weight", pack_qkv(q, k, v, preset)
        gate, up = (get(hf + s) for s in LAYER_FUSED["mlp.linear_fc1.weight"])
        yield mc + "mlp.linear_fc1.weight", torch.cat([gate, up], dim=0)
    yield "decoder.final_layernorm.weight", get(f"{hf_prefix}.norm.weight")
    if preset.untie_embeddings:
        yield "output_layer.weight", get(lm_head)


def mcore_to_hf(
    get: Callable[[str], torch.Tensor],
    preset: ModelPreset,
    hf_prefix: str = "model",
    lm_head: str = "lm_head.weight",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) pairs from canonical megatron tensors read through ``get``."""
    yield f"{hf_prefix}.embed_tokens.weight", get("embedding.word_embeddings.weight")[: preset.vocab_size]
    for i in range(preset.num_layers):
        mc, hf = _layer_names(i, f"{hf_prefix}.layers")
        for mc_suffix, hf_suffix in LAYER_COPY.items():
            yield hf + hf_suffix, get(mc + mc_suffix)
        q, k, v = unpack_qkv(get(mc + "self_attention.linear_qkv.weight"), preset)
        for name, t in zip(LAYER_FUSED["self_attention.linear_qkv.weight"], (q, k, v)):
            yield hf + name, t
        gate, up = torch.chunk(get(mc + "mlp.linear_fc1.weight"), 2, dim=0)
        yield hf + "mlp.gate_proj.weight", gate.contiguous()
        yield hf + "mlp.up_proj.weight", up.contiguous()
    yield f"{hf_prefix}.norm.weight", get("decoder.final_layernorm.weight")
    if preset.untie_embeddings:
        yield lm_head, get("output_layer.weight")[: preset.vocab_size]


# --------------------------------------------------------------------------- sharding
def _suffix(name: str) -> str:
    if name.startswith("decoder.layers."):
        return name.split(".", 3)[3]
    return name


def shard_tp(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The TP shard of a canonical tensor held by ``tp_rank``."""
    suffix = _suffix(name)
    if suffix not in TP_DIM:
        raise KeyError(f"no TP layout known for tensor {name!r}")
    dim = TP_DIM[suffix]
    if dim is None or tp_size == 1:
        return full
    if suffix == "mlp.linear_fc1.weight":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat(
            [torch.chunk(gate, tp_size, dim=0)[tp_rank], torch.chunk(up, tp_size, dim=0)[tp_rank]], dim=0
        )
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


def unshard_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard_tp` given every rank's shard in TP-rank order."""
    suffix = _suffix(name)
    dim = TP_DIM[suffix]
    if dim is None or len(shards) == 1:
        return shards[0]
    if suffix == "mlp.linear_fc1.weight":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def _pad_vocab(name: str, t: torch.Tensor, padded: int) -> torch.Tensor:
    if name in ("embedding.word_embeddings.weight", "output_layer.weight") and t.shape[0] < padded:
        pad = torch.zeros(padded - t.shape[0], *t.shape[1:], dtype=t.dtype)
        return torch.cat([t, pad], dim=0)
    return t


def local_to_canonical_names(chunk) -> dict[str, str]:
    """Map each parameter name of a model chunk to its canonical (global-layer) name.

    Transformer Engine specs fuse the norms into the following linear layer; those names are mapped
    to the local-spec names so that one canonical table serves both.
    """
    out = {}
    te_norms = {
        "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    }
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


@torch.no_grad()
def load_canonical_into_chunks(chunks: Iterable[torch.nn.Module], canonical: dict[str, torch.Tensor], preset: ModelPreset) -> None:
    """Copy canonical full tensors into this rank's model chunks (any TP/PP/VPP layout)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    padded = padded_vocab_size(preset.vocab_size, tp_size)
    missing = []
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        while hasattr(module, "module") and not hasattr(module, "decoder"):
            module = module.module
        names = local_to_canonical_names(module)
        params = dict(module.named_parameters())
        for local, canon in names.items():
            if canon not in canonical:
                missing.append(canon)
                continue
            full = _pad_vocab(canon, canonical[canon], padded)
            shard = shard_tp(canon, full, tp_rank, tp_size)
            param = params[local]
            if param.shape != shard.shape:
                raise ValueError(f"{canon}: checkpoint shard {tuple(shard.shape)} != model {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
    if missing:
        raise KeyError(f"tensors missing from the checkpoint: {sorted(set(missing))}")


@torch.no_grad()
def gather_canonical(chunks: Iterable[torch.nn.Module], preset: ModelPreset) -> dict[str, torch.Tensor]:
    """Every canonical full tensor of a TP/PP-sharded model, on every rank (CPU tensors).

    Meant for small models (tests, tiny demos, comparisons): it gathers everything into memory.
    Large checkpoints go through dist_checkpointing instead.
    """
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        module = chunk
        while hasattr(module, "module") and not hasattr(module, "decoder"):
            module = module.module
        params = dict(module.named_parameters())
        for name, canon in local_to_canonical_names(module).items():
            shard = params[name].detach().float().contiguous()
            if tp_size > 1 and TP_DIM[_suffix(canon)] is not None:
                pieces = [torch.empty_like(shard) for _ in range(tp_size)]
                torch.distributed.all_gather(pieces, shard, group=tp_group)
                full = unshard_tp(canon, [p.cpu() for p in pieces])
            else:
                full = shard.cpu()
            if canon in ("embedding.word_embeddings.weight", "output_layer.weight"):
                full = full[: preset.vocab_size]
            local[canon] = full.clone()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        return local
    gathered: list = [None] * pp_size
    torch.distributed.all_gather_object(gathered, local, group=parallel_state.get_pipeline_model_parallel_group())
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        out.update(part)
    return out
