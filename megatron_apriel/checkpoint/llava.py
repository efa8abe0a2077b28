"""The HF LlavaForConditionalGeneration (Pixtral vision) <-> megatron-core LlavaModel mapping.

One explicit table, extending :mod:`megatron_apriel.checkpoint.mistral` (which maps the decoder,
under the on-disk prefix ``language_model.model``). Canonical megatron names are those of a TP=1
:class:`megatron_apriel.models.llava.LlavaModel`'s dist checkpoint: decoder names exactly as a text
GPTModel's (``embedding.*``, ``decoder.layers.{i}.*``, ``output_layer.weight``), then

* ``vision_model.patch_conv.weight``, ``vision_model.ln_pre.weight``;
* ``vision_model.transformer.layers.{i}.<suffix>``: the suffixes of the Mistral table, with the
  Pixtral names in :data:`VISION_LAYER_COPY` / :data:`VISION_LAYER_FUSED`; ``linear_qkv`` is the
  grouped layout of ``mistral.pack_qkv`` with one group per head (Pixtral attention is MHA);
* ``vision_projection.encoder.linear_fc{1,2}.{weight,bias}`` = ``multi_modal_projector.linear_{1,2}``.

HF names are read in either layout transformers knows (hub: ``vision_tower.``, ``language_model.model.``;
in-memory v5: ``model.vision_tower.``, ``model.language_model.``) and always written in the hub layout
of Pixtral-12B. Only ``vision_feature_layer = -1`` with strategy ``full`` (Pixtral's) is supported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from megatron_apriel.checkpoint import mistral
from megatron_apriel.models.llava import vision_layers_preset
from megatron_apriel.models.presets import ModelPreset, VisionPreset

VISION_LAYER_COPY = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attention.linear_proj.weight": "attention.o_proj.weight",
    "pre_mlp_layernorm.weight": "ffn_norm.weight",
    "mlp.linear_fc2.weight": "feed_forward.down_proj.weight",
}
VISION_LAYER_FUSED = {
    "self_attention.linear_qkv.weight": ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"),
    "mlp.linear_fc1.weight": ("feed_forward.gate_proj.weight", "feed_forward.up_proj.weight"),
}
VISION_GLOBAL = {  # canonical -> HF suffix after the vision / projector prefix
    "vision_model.patch_conv.weight": ("vision", "patch_conv.weight"),
    "vision_model.ln_pre.weight": ("vision", "ln_pre.weight"),
    "vision_projection.encoder.linear_fc1.weight": ("projector", "linear_1.weight"),
    "vision_projection.encoder.linear_fc1.bias": ("projector", "linear_1.bias"),
    "vision_projection.encoder.linear_fc2.weight": ("projector", "linear_2.weight"),
    "vision_projection.encoder.linear_fc2.bias": ("projector", "linear_2.bias"),
}
# TP layout of the non-layer vision tensors (layers follow mistral.TP_DIM).
VISION_TP_DIM = {
    "vision_model.patch_conv.weight": None,
    "vision_model.ln_pre.weight": None,
    "vision_projection.encoder.linear_fc1.weight": 0,
    "vision_projection.encoder.linear_fc1.bias": 0,
    "vision_projection.encoder.linear_fc2.weight": 1,
    "vision_projection.encoder.linear_fc2.bias": None,
}
VISION_LAYER_PREFIX = "vision_model.transformer.layers."
# On-disk layouts: (decoder prefix, lm_head, vision prefix, projector prefix).
HUB_LAYOUT = ("language_model.model", "language_model.lm_head.weight", "vision_tower", "multi_modal_projector")
V5_LAYOUT = ("model.language_model", "lm_head.weight", "model.vision_tower", "model.multi_modal_projector")


# --------------------------------------------------------------------------- configs
def preset_from_hf_config(cfg, name: str = "from-hf") -> ModelPreset:
    """A multimodal preset from a transformers LlavaConfig with a Pixtral vision config.

    The text and vision configs go through :func:`models.hf_config.check_hf_config`, which refuses
    (``HFConfigError``, a ValueError naming the field) what the megatron-core model cannot compute.
    """
    from megatron_apriel.models.hf_config import check_hf_config

    checked = check_hf_config(cfg)
    if checked.vision is None:
        raise ValueError(f"{name}: no vision_config; not a Llava/Pixtral config")
    return ModelPreset(name=name, hf_architecture="LlavaForConditionalGeneration", vision=VisionPreset(**checked.vision),
                       **checked.text)


def hf_config(preset: ModelPreset, dtype: Optional[torch.dtype] = None):
    """The transformers LlavaConfig (Pixtral vision, Mistral text) of a multimodal preset."""
    from transformers import LlavaConfig, PixtralVisionConfig

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


# --------------------------------------------------------------------------- the table
def vision_hf_names(vision: VisionPreset, layout=HUB_LAYOUT) -> list[str]:
    names = [_hf_global(c, layout) for c in VISION_GLOBAL]
    for i in range(vision.num_layers):
        hf = f"{layout[2]}.transformer.layers.{i}."
        names += [hf + s for s in VISION_LAYER_COPY.values()]
        for parts in VISION_LAYER_FUSED.values():
            names += [hf + s for s in parts]
    return names


def hf_names(preset: ModelPreset, layout=HUB_LAYOUT) -> list[str]:
    """Every HF tensor name a Llava checkpoint of this preset must contain."""
    return mistral.hf_names(preset, layout[0], layout[1]) + vision_hf_names(preset.vision, layout)


def _hf_global(canon: str, layout) -> str:
    where, suffix = VISION_GLOBAL[canon]
    return f"{layout[2] if where == 'vision' else layout[3]}.{suffix}"


def vision_hf_to_mcore(get: Callable[[str], torch.Tensor], vision: VisionPreset, layout=HUB_LAYOUT) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) of the vision encoder and projector, reading HF tensors through ``get``."""
    lp = vision_layers_preset(vision)
    for canon in VISION_GLOBAL:
        yield canon, get(_hf_global(canon, layout))
    for i in range(vision.num_layers):
        mc, hf = f"{VISION_LAYER_PREFIX}{i}.", f"{layout[2]}.transformer.layers.{i}."
        for mc_suffix, hf_suffix in VISION_LAYER_COPY.items():
            yield mc + mc_suffix, get(hf + hf_suffix)
        q, k, v = (get(hf + s) for s in VISION_LAYER_FUSED["self_attention.linear_qkv.weight"])
        yield mc + "self_attention.linear_qkv.weight", mistral.pack_qkv(q, k, v, lp)
        gate, up = (get(hf + s) for s in VISION_LAYER_FUSED["mlp.linear_fc1.weight"])
        yield mc + "mlp.linear_fc1.weight", torch.cat([gate, up], dim=0)


def vision_mcore_to_hf(get: Callable[[str], torch.Tensor], vision: VisionPreset, layout=HUB_LAYOUT) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the vision encoder and projector from canonical tensors."""
    lp = vision_layers_preset(vision)
    for canon in VISION_GLOBAL:
        yield _hf_global(canon, layout), get(canon)
    for i in range(vision.num_layers):
        mc, hf = f"{VISION_LAYER_PREFIX}{i}.", f"{layout[2]}.transformer.layers.{i}."
        for mc_suffix, hf_suffix in VISION_LAYER_COPY.items():
            yield hf + hf_suffix, get(mc + mc_suffix)
        q, k, v = mistral.unpack_qkv(get(mc + "self_attention.linear_qkv.weight"), lp)
        for name, t in zip(VISION_LAYER_FUSED["self_attention.linear_qkv.weight"], (q, k, v)):
            yield hf + name, t
        gate, up = torch.chunk(get(mc + "mlp.linear_fc1.weight"), 2, dim=0)
        yield hf + "feed_forward.gate_proj.weight", gate.contiguous()
        yield hf + "feed_forward.up_proj.weight", up.contiguous()


def hf_to_mcore(get, preset: ModelPreset, layout=HUB_LAYOUT) -> Iterator[tuple[str, torch.Tensor]]:
    """Every canonical tensor of a Llava checkpoint: decoder (Mistral table), then vision."""
    yield from mistral.hf_to_mcore(get, preset, layout[0], layout[1])
    yield from vision_hf_to_mcore(get, preset.vision, layout)


def mcore_to_hf(get, preset: ModelPreset, layout=HUB_LAYOUT) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor (hub layout) from canonical tensors."""
    yield from mistral.mcore_to_hf(get, preset, layout[0], layout[1])
    yield from vision_mcore_to_hf(get, preset.vision, layout)


def num_hf_tensors(preset: ModelPreset) -> int:
    return len(hf_names(preset))


# --------------------------------------------------------------------------- reading HF
def detect_layout(keys: Iterable[str]) -> tuple[str, str, str, str]:
    keys = set(keys)
    for layout in (HUB_LAYOUT, V5_LAYOUT):
        if f"{layout[2]}.patch_conv.weight" in keys:
            return layout
    raise KeyError("no vision_tower.patch_conv.weight: not a Llava/Pixtral checkpoint")


class HFLlavaCanonical:
    """Canonical tensors computed on demand from an HF Llava checkpoint (a mapping, one at a time).

    Refuses a checkpoint with missing tensors or tensors the table does not know.
    """

    def __init__(self, reader, preset: ModelPreset):
        self.reader, self.preset = reader, preset
        try:
            self.layout = detect_layout(reader.keys())
        except KeyError as e:
            raise ValueError(f"{reader.folder}: {e.args[0]}") from None
        self.prefix, self.lm_head = self.layout[0], self.layout[1]
        expected = set(hf_names(preset, self.layout))
        present = set(reader.keys())
        missing = expected - present
        if missing:
            raise ValueError(f"{reader.folder}: tensors missing: {_limited(missing)}")
        unknown = {k for k in present - expected if not k.endswith("rotary_emb.inv_freq")}
        if unknown:
            raise ValueError(f"{reader.folder}: tensors the Llava table does not know: {_limited(unknown)}")
        self.hf_bytes = 0

    def _get(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        self.hf_bytes += t.numel() * t.element_size()
        return t

    def _single(self, canon: str):
        """Run the streaming table for one canonical tensor (it reads only that tensor's HF parts)."""
        if canon.startswith(("vision_model.", "vision_projection.")):
            if canon in VISION_GLOBAL:
                return self._get(_hf_global(canon, self.layout))
            if not canon.startswith(VISION_LAYER_PREFIX):
                raise KeyError(canon)
            i, suffix = canon[len(VISION_LAYER_PREFIX):].split(".", 1)
            hf = f"{self.layout[2]}.transformer.layers.{i}."
            if suffix in VISION_LAYER_COPY:
                return self._get(hf + VISION_LAYER_COPY[suffix])
            if suffix == "self_attention.linear_qkv.weight":
                q, k, v = (self._get(hf + s) for s in VISION_LAYER_FUSED[suffix])
                return mistral.pack_qkv(q, k, v, vision_layers_preset(self.preset.vision))
            if suffix == "mlp.linear_fc1.weight":
                return torch.cat([self._get(hf + s) for s in VISION_LAYER_FUSED[suffix]], dim=0)
            raise KeyError(canon)
        return self._decoder(canon)

    def _decoder(self, canon: str) -> torch.Tensor:
        glob = {"embedding.word_embeddings.weight": f"{self.prefix}.embed_tokens.weight",
                "decoder.final_layernorm.weight": f"{self.prefix}.norm.weight",
                "output_layer.weight": self.lm_head}
        if canon in glob:
            return self._get(glob[canon])
        if not canon.startswith("decoder.layers."):
            raise KeyError(canon)
        _, _, i, suffix = canon.split(".", 3)
        hf = f"{self.prefix}.layers.{i}."
        if suffix in mistral.LAYER_COPY:
            return self._get(hf + mistral.LAYER_COPY[suffix])
        parts = [self._get(hf + p) for p in mistral.LAYER_FUSED[suffix]]
        if suffix == "self_attention.linear_qkv.weight":
            return mistral.pack_qkv(*parts, self.preset)
        return torch.cat(parts, dim=0)

    def __contains__(self, name: str) -> bool:
        return name in _canonical_names(self.preset)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        return self._single(name)


def _canonical_names(preset: ModelPreset) -> set[str]:
    names = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"} | set(VISION_GLOBAL)
    if preset.untie_embeddings:
        names.add("output_layer.weight")
    suffixes = tuple(mistral.LAYER_COPY) + tuple(mistral.LAYER_FUSED)
    names |= {f"decoder.layers.{i}.{s}" for i in range(preset.num_layers) for s in suffixes}
    names |= {f"{VISION_LAYER_PREFIX}{i}.{s}" for i in range(preset.vision.num_layers) for s in suffixes}
    return names


def _limited(names, n: int = 20) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------- TP shards of vision tensors
def _vision_tp_dim(canon: str):
    if canon in VISION_TP_DIM:
        return VISION_TP_DIM[canon], None
    if canon.startswith(VISION_LAYER_PREFIX):
        suffix = canon[len(VISION_LAYER_PREFIX):].split(".", 1)[1]
        return mistral.TP_DIM[suffix], "decoder.layers.0." + suffix
    raise KeyError(f"no TP layout known for tensor {canon!r}")


def shard_tp(canon: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    dim, as_decoder = _vision_tp_dim(canon)
    if as_decoder is not None:  # same layouts as the decoder's (qkv groups, gated fc1)
        return mistral.shard_tp(as_decoder, full, tp_rank, tp_size)
    return full if dim is None or tp_size == 1 else torch.chunk(full, tp_size, dim=dim)[tp_rank]


def unshard_tp(canon: str, shards: list[torch.Tensor]) -> torch.Tensor:
    dim, as_decoder = _vision_tp_dim(canon)
    if as_decoder is not None:
        return mistral.unshard_tp(as_decoder, shards)
    return shards[0] if dim is None or len(shards) == 1 else torch.cat(shards, dim=dim)


def _unwrap(chunk):
    from megatron_apriel.models.llava import LlavaModel

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


@torch.no_grad()
def load_canonical_into_llava(chunks, canonical, preset: ModelPreset) -> None:
    """Copy canonical full tensors into this rank's LlavaModel chunks (decoder at any TP/PP)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    models = [_unwrap(c) for c in chunks]
    mistral.load_canonical_into_chunks([m.language_model for m in models], canonical, preset)
    missing = []
    for m in models:
        for canon, param in _vision_params(m):
            if canon not in canonical:
                missing.append(canon)
                continue
            shard = shard_tp(canon, canonical[canon], tp_rank, tp_size)
            if param.shape != shard.shape:
                raise ValueError(f"{canon}: checkpoint shard {tuple(shard.shape)} != model {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
    if missing:
        raise KeyError(f"tensors missing from the checkpoint: {sorted(missing)}")


@torch.no_grad()
def gather_llava_canonical(chunks, preset: ModelPreset) -> dict[str, torch.Tensor]:
    """Every canonical full tensor of a TP/PP-sharded LlavaModel, on every rank (small models only)."""
    from megatron.core import parallel_state

    models = [_unwrap(c) for c in chunks]
    out = mistral.gather_canonical([m.language_model for m in models], preset)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local = {}
    for m in models:
        for canon, param in _vision_params(m):
            shard = param.detach().float().contiguous()
            if tp_size > 1 and _vision_tp_dim(canon)[0] is not None:
                pieces = [torch.empty_like(shard) for _ in range(tp_size)]
                torch.distributed.all_gather(pieces, shard, group=parallel_state.get_tensor_model_parallel_group())
                local[canon] = unshard_tp(canon, [p.cpu() for p in pieces]).clone()
            else:
                local[canon] = shard.cpu().clone()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        parts: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(parts, local, group=parallel_state.get_pipeline_model_parallel_group())
        for part in parts:
            out.update(part)
    else:
        out.update(local)
    return out


def is_llava_hf_dir(hf_dir: str | os.PathLike) -> bool:
    import json

    path = Path(hf_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return "vision_config" in cfg


def _read_stacked(reader, key: str, layer: int) -> torch.Tensor:
    """One layer of a stacked vision tensor (the reader reads only the stored chunks it overlaps)."""
    return reader.read(key, layer, layer + 1)[0]


# --------------------------------------------------------------------------- conversion
# The text converter (:mod:`convert`) hands Llava folders and multimodal checkpoints to the two
# functions below; they reuse its reader, writer, metadata and atomic-output helpers and differ in
# the model built (LlavaModel), the table (decoder + vision) and the HF config (LlavaConfig).
def hf_to_mcore_checkpoint(hf_dir, out_dir, tp: int = 1, pp: int = 1, dtype=None, tokenizer: Optional[str] = None,
                           force: bool = False) -> dict:
    """HF LlavaForConditionalGeneration folder -> LlavaModel dist checkpoint (decoder at any TP/PP)."""
    import time

    from megatron.core import dist_checkpointing

    from megatron_apriel.checkpoint import convert as cv
    from megatron_apriel.checkpoint.hf_io import SafetensorsReader, copy_side_files, write_output_dir
    from megatron_apriel.models.llava import build_llava_chunks
    from megatron_apriel.runtime import init_distributed

    from megatron_apriel.models.hf_config import HFConfigError, check_hf_dir

    start = time.time()
    try:
        cfg, _ = check_hf_dir(hf_dir, report=cv._is_rank0())
        preset = preset_from_hf_config(cfg, name=Path(hf_dir).name)
    except HFConfigError as e:
        raise cv.ConversionError(str(e)) from None
    reader = SafetensorsReader(hf_dir)
    try:
        canonical = HFLlavaCanonical(reader, preset)
    except ValueError as e:
        raise cv.ConversionError(str(e)) from None
    if isinstance(dtype, str):
        dtype = cv.parse_dtype(dtype)
    dtype = dtype or cv._safetensors_dtype(reader, canonical.prefix)
    v = preset.vision
    for what, n in (("heads", preset.num_attention_heads), ("query groups", preset.num_query_groups),
                    ("ffn", preset.ffn_hidden_size), ("vision heads", v.num_attention_heads),
                    ("vision ffn", v.ffn_hidden_size), ("hidden (projector)", preset.hidden_size)):
        if n % tp:
            raise cv.ConversionError(f"tp={tp} does not divide the {what} ({n}) of {hf_dir}")
    if preset.num_layers % pp:
        raise cv.ConversionError(f"pp={pp} does not divide num_layers={preset.num_layers}")
    out = Path(out_dir)
    if cv._is_rank0() and out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")

    init_distributed(tp=tp, pp=pp, device="cpu", seed=None)
    config = preset.transformer_config(tp=tp, pp=pp, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                       fp16=dtype == torch.float16, device="cpu", perform_initialization=False)
    chunks = build_llava_chunks(preset, config)
    n_params = sum(1 for c in chunks for _ in c.parameters())
    bar = cv._progress(n_params, "hf-to-mcore (llava)")

    class _Tracked:  # counts each parameter's read for the progress bar
        def __contains__(self, name):
            return name in canonical

        def __getitem__(self, name):
            t = canonical[name]
            bar.update(1)
            return t

    load_canonical_into_llava(chunks, _Tracked(), preset)
    bar.close()
    reader.close()
    state = {"model": chunks[0].sharded_state_dict(), "checkpoint_version": 3.0}

    def write(tmp: Path) -> None:
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

        dist_checkpointing.save(state, str(tmp), get_default_save_sharded_strategy("torch_dist"))
        if cv._is_rank0():
            cv.write_model_meta(tmp, preset, dtype, source=str(Path(hf_dir).resolve()), saved_tp=tp, saved_pp=pp)
            side = tmp / cv.HF_SIDE
            side.mkdir()
            copy_side_files(hf_dir, side)
            if tokenizer:
                cv._copy_tokenizer(tokenizer, side)

    write_output_dir(out, write, force=force)
    summary = {"tensors": n_params, "bytes": canonical.hf_bytes, "dtype": cv._dtype_name(dtype), "tp": tp, "pp": pp,
               "seconds": round(time.time() - start, 2)}
    cv._log(f"hf-to-mcore (llava): {n_params} tensors per rank, {canonical.hf_bytes / 1e9:.3f} GB read, "
            f"{summary['dtype']}, tp={tp} pp={pp}, {summary['seconds']:.1f} s -> {out}")
    return summary


def mcore_to_hf_checkpoint(ckpt_dir, out_dir, preset: ModelPreset, tokenizer: Optional[str] = None,
                           chat_template: Optional[str] = None, dtype=None, max_shard_bytes: int = 5 * 1024**3,
                           force: bool = False) -> dict:
    """LlavaModel dist checkpoint -> HF LlavaForConditionalGeneration folder (hub layout), streamed."""
    import time

    from megatron_apriel.checkpoint import convert as cv
    from megatron_apriel.checkpoint.hf_io import ShardedSafetensorsWriter, atomic_output_dir

    start = time.time()
    reader = cv.McoreCheckpointReader(ckpt_dir)
    if preset.num_layers != reader.num_layers:
        raise cv.ConversionError(f"{reader.path}: {reader.num_layers} layers stored but preset {preset.name} "
                                 f"has {preset.num_layers}")
    if "vision_model.patch_conv.weight" not in reader.meta:
        raise cv.ConversionError(f"{reader.path}: no vision_model tensors; not a multimodal checkpoint")
    if isinstance(dtype, str):
        dtype = cv.parse_dtype(dtype)
    dtype = dtype or reader.meta["embedding.word_embeddings.weight"].dtype
    side = Path(reader.path) / cv.HF_SIDE
    side = side if side.is_dir() else None
    template = cv.read_chat_template(chat_template)

    def get(name: str) -> torch.Tensor:
        if name.startswith(VISION_LAYER_PREFIX):
            i, suffix = name[len(VISION_LAYER_PREFIX):].split(".", 1)
            return _read_stacked(reader, VISION_LAYER_PREFIX + cv._STORED_LAYER_KEY.get(suffix, suffix), int(i))
        return reader.get(name)

    total = num_hf_tensors(preset)
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes)
        bar = cv._progress(total, "mcore-to-hf (llava)")
        try:
            for name, t in mcore_to_hf(get, preset):
                writer.add(name, t.to(dtype).contiguous())
                bar.update(1)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        bar.close()
        hf_config(preset, dtype).save_pretrained(tmp)
        copied = cv.write_hf_side_files(tmp, out_dir, preset, side, tokenizer, template)
    summary = {"tensors": writer.num_tensors, "bytes": writer.total_bytes, "dtype": cv._dtype_name(dtype),
               "seconds": round(time.time() - start, 2), "tokenizer_files": copied}
    cv._log(f"mcore-to-hf (llava): {writer.num_tensors} tensors, {writer.total_bytes / 1e9:.3f} GB, "
            f"{summary['dtype']}, {summary['seconds']:.1f} s -> {out_dir}")
    return summary
