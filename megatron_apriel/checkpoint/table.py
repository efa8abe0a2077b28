"""The shape of a name table, and the operations every model family's table shares.

A family driver (:mod:`~megatron_apriel.checkpoint.mistral`, :mod:`~megatron_apriel.checkpoint.llava`)
lists its tensors once, as :class:`Entry` rows: the canonical megatron name, the HF tensors it is
made of, how they are fused, and how TP splits it. Everything else is derived from those rows here:
the HF names a checkpoint must hold, both directions of the mapping, the lazy HF reader used by the
converter, TP sharding, and copying into / gathering from a sharded model.

Canonical names are those of a TP=1, PP=1 model built with the local spec, with global layer
indices and full (unsharded) tensors: what dist_checkpointing stores, so conversion, averaging and
loading all speak it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_apriel.checkpoint.dcp_io import ConversionError, limited
from megatron_apriel.models.presets import ModelPreset

COPY, QKV, GATED = "copy", "qkv", "gated"

# Canonical names of megatron-core's GPT decoder (local spec), which every family's language model is:
# the tensors outside the layers, and each layer's suffixes under ``decoder.layers.<i>.``. Their order
# is the order a checkpoint streams in (McoreCheckpointReader.keys), which averaging follows, so the
# bytes an average writes depend on it: change it only with that in mind.
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
LAYER_SUFFIXES = (
    "input_layernorm.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc2.weight",
    "self_attention.linear_qkv.weight",
    "mlp.linear_fc1.weight",
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One canonical tensor and the HF tensors it is made of.

    ``fuse``: :data:`COPY` (one HF tensor as it is), :data:`QKV` (q, k, v packed per KV group with the
    attention geometry of ``heads``, see :func:`pack_qkv`) or :data:`GATED` (cat(gate, up) on dim 0).
    ``tp_dim``: the dim TP splits, None when replicated (a gated tensor splits each half).
    ``vocab``: rows kept on export (the model pads embeddings to a TP-divisible vocabulary).
    """

    canon: str
    hf: tuple[str, ...]
    fuse: str = COPY
    tp_dim: Optional[int] = None
    heads: Optional[ModelPreset] = None
    vocab: Optional[int] = None


# --------------------------------------------------------------------------- layouts of fused tensors
def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset: ModelPreset) -> torch.Tensor:
    """For each KV group g: [q rows of the heads of g; k rows of g; v rows of g], stacked over groups.
    A contiguous TP shard of this tensor is exactly the rows of that rank's groups."""
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


def to_canonical(entry: Entry, parts: list[torch.Tensor]) -> torch.Tensor:
    if entry.fuse == QKV:
        return pack_qkv(*parts, entry.heads)
    if entry.fuse == GATED:
        return torch.cat(parts, dim=0)
    return parts[0]


def to_hf(entry: Entry, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if entry.fuse == QKV:
        return unpack_qkv(t, entry.heads)
    if entry.fuse == GATED:
        return tuple(h.contiguous() for h in torch.chunk(t, 2, dim=0))
    return (t if entry.vocab is None else t[: entry.vocab],)


# --------------------------------------------------------------------------- both directions
def hf_names(entries: Iterable[Entry]) -> list[str]:
    return [h for e in entries for h in e.hf]


def hf_to_mcore(get: Callable[[str], torch.Tensor], entries: Iterable[Entry]) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) of every entry, reading its HF parts through ``get`` in table order
    (a few tensors alive at a time, so the caller can stream from safetensors)."""
    for e in entries:
        yield e.canon, to_canonical(e, [get(h) for h in e.hf])


def mcore_to_hf(get: Callable[[str], torch.Tensor], entries: Iterable[Entry]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every entry's parts from canonical tensors read through ``get``."""
    for e in entries:
        yield from zip(e.hf, to_hf(e, get(e.canon)))


class HFCanonical:
    """Canonical tensors computed on demand from an HF checkpoint, one at a time (a mapping).

    What the loaders of :mod:`mistral` / :mod:`llava` read from: they ask for one canonical tensor
    per parameter, so only that tensor (and its HF parts) is alive besides the model. Refuses a
    checkpoint with missing tensors or with tensors the table does not know (``ignore``: prefixes of
    names another table owns).
    """

    def __init__(self, reader, entries: list[Entry], family: str, num_layers: int, ignore: tuple[str, ...] = ()):
        self.reader = reader
        self.entries = {e.canon: e for e in entries}
        expected = set(hf_names(entries))
        present = set(reader.keys())
        missing = expected - present
        if missing:
            raise ConversionError(f"{reader.folder}: tensors missing for {num_layers} layers: {limited(missing)}")
        unknown = {k for k in present - expected if not k.endswith("rotary_emb.inv_freq") and not k.startswith(ignore)}
        if unknown:
            raise ConversionError(f"{reader.folder}: tensors the {family} table does not know: {limited(unknown)}")
        self.hf_bytes = 0

    def _get(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        # Closing the file unmaps it once this tensor is freed: pages of tensors already copied
        # into the model would otherwise stay resident and count a second model in RSS.
        self.reader.close()
        self.hf_bytes += t.numel() * t.element_size()
        return t

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return to_canonical(e, [self._get(h) for h in e.hf])


# --------------------------------------------------------------------------- TP
def shard(full: torch.Tensor, dim: Optional[int], gated: bool, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The TP shard held by ``tp_rank``: a chunk on ``dim``; of a gated [gate; up] tensor, [gate_shard; up_shard]."""
    if dim is None or tp_size == 1:
        return full
    if gated:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size, dim=0)[tp_rank], torch.chunk(up, tp_size, dim=0)[tp_rank]], dim=0)
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


def unshard(shards: list[torch.Tensor], dim: Optional[int], gated: bool) -> torch.Tensor:
    """Inverse of :func:`shard` given every rank's shard in TP-rank order."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


# A family's TP rule: canonical name -> (dim split or None, gated).
TPRule = Callable[[str], tuple[Optional[int], bool]]


@torch.no_grad()
def load_params(params: Iterable[tuple[str, torch.nn.Parameter]], canonical, tp_rule: TPRule,
                prepare: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t) -> list[str]:
    """Copy this rank's TP shard of each canonical tensor into its parameter; returns the names missing.

    ``params``: (canonical name, parameter) of this rank; ``prepare`` adjusts a full tensor before
    sharding (vocabulary padding).
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    missing = []
    for canon, param in params:
        if canon not in canonical:
            missing.append(canon)
            continue
        piece = shard(prepare(canon, canonical[canon]), *tp_rule(canon), tp_rank, tp_size)
        if param.shape != piece.shape:
            raise ValueError(f"{canon}: checkpoint shard {tuple(piece.shape)} != model {tuple(param.shape)}")
        param.copy_(piece.to(param.dtype))
    return missing


@torch.no_grad()
def gather_params(params: Iterable[tuple[str, torch.nn.Parameter]], tp_rule: TPRule) -> dict[str, torch.Tensor]:
    """Every canonical full tensor of this rank's parameters (TP shards gathered), on every PP stage.

    Meant for small models (tests, tiny demos, comparisons): it gathers everything into memory.
    """
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local: dict[str, torch.Tensor] = {}
    for canon, param in params:
        piece = param.detach().float().contiguous()
        dim, gated = tp_rule(canon)
        if tp_size > 1 and dim is not None:
            pieces = [torch.empty_like(piece) for _ in range(tp_size)]
            torch.distributed.all_gather(pieces, piece, group=parallel_state.get_tensor_model_parallel_group())
            local[canon] = unshard([p.cpu() for p in pieces], dim, gated).clone()
        else:
            local[canon] = piece.cpu().clone()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        return local
    gathered: list = [None] * pp_size
    torch.distributed.all_gather_object(gathered, local, group=parallel_state.get_pipeline_model_parallel_group())
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        out.update(part)
    return out
