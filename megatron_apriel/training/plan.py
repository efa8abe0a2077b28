"""The run plan: everything a training run decides about its config, decided once, before it starts.

:func:`make_plan` turns a :class:`TrainConfig` and the world it will run at into a :class:`RunPlan`:
the preset and its model family, the parsed blend, the starting checkpoint, the layout (TP/PP/VPP/CP/DP,
micro-batches per step) and the arguments of megatron-core's ``TransformerConfig``. It needs no
process group and no GPU, so a config error is found where it is cheapest:

- ``apriel train`` (the real run) makes the plan before ``torch.distributed`` starts; a bad config
  exits 2 with one ``error: <key>: ...`` line before any rank joins a rendezvous, so a cluster job
  does not wait in the queue and take an allocation to report a typo;
- ``apriel train --dry-run`` makes the same plan at the layout of ``--nodes x --gpus-per-node`` and
  then builds every rank position on the meta device (``training.dry_run``): whatever the real run
  refuses, the dry run refuses in the same words, because there is only this one function deciding;
- the SLURM launchers run the dry run's plan on the batch node before ``srun`` (``slurm/common.sh``).

Nothing else re-derives these: the loop reads ``plan.preset``, ``plan.blend``, ``plan.load``,
``plan.layout`` and ``plan.transformer_config()``; the dry run reads the same fields.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_apriel.checkpoint.dcp_io import MODEL_META, ConversionError, read_model_meta
from megatron_apriel.config import ConfigError
from megatron_apriel.data.blends import BlendSpec, blend_weights, resolve_stage, stage_checkpoint, train_samples_for
from megatron_apriel.models import float8, torch_fusions
from megatron_apriel.models.builder import check_fp8, should_use_te
from megatron_apriel.models.families import ModelFamily, family_of
from megatron_apriel.models.presets import PRESETS, ModelPreset, get_preset
from megatron_apriel.runtime.distributed import detect_launcher, resolve_device
from megatron_apriel.training.checkpointing import read_latest
from megatron_apriel.training.config import TrainConfig, blend_spec_of

# slurm/cpt.sh's defaults, the geometry the recipe's configs are written for
DEFAULT_GPUS_PER_NODE = 8


@dataclass
class Layout:
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class RunPlan:
    """What a run of ``cfg`` is, decided by :func:`make_plan` (see module docstring)."""

    cfg: TrainConfig
    preset: ModelPreset
    family: ModelFamily
    blend: Optional[BlendSpec]  # data.kind blend: the parsed spec (its stage not yet resolved)
    load: Optional[str]  # the starting checkpoint: checkpoint.load, or the blend stage's
    resumes: bool  # checkpoint.save holds a complete checkpoint: a full resume, load is not used
    layout: Layout
    microbatches: int  # per DP rank per step
    device: str  # cuda | cpu: where the run computes (the dry run: cuda, the cluster it plans for)
    use_te: bool
    torch_fusions: tuple[str, ...]  # requested; installed after the process group starts
    transformer_args: dict
    notes: list[str] = field(default_factory=list)
    data_lines: list[str] = field(default_factory=list)  # what the data and checkpoint checks found
    fp8: str = "none"  # model.fp8, normalized (models/float8.py)

    def fp8_build_args(self, tcfg) -> dict:
        """The chunk builder's float8 arguments: for a torchao recipe, the recipe and the global
        layers it applies to (all but model.fp8_bf16_first/last_layers); else none."""
        from megatron_apriel.models.builder import float8_layers  # megatron-core: only when building

        if not float8.torchao_recipe(self.fp8):
            return {}
        m = self.cfg.model
        return dict(fp8=self.fp8, fp8_layers=float8_layers(tcfg, self.fp8, m.fp8_bf16_first_layers,
                                                           m.fp8_bf16_last_layers))

    def transformer_config(self, **overrides):
        """megatron-core's ``TransformerConfig`` of the run (``overrides`` replace plan arguments)."""
        return self.preset.transformer_config(**{**self.transformer_args, **overrides})


def preset_of(cfg: TrainConfig) -> ModelPreset:
    m = cfg.model
    if not m.preset:
        raise ConfigError(f"model.preset: not given (known: {', '.join(sorted(PRESETS))})")
    try:
        return get_preset(m.preset, **m.changes)
    except KeyError as e:
        raise ConfigError(f"model.preset: {e.args[0]}") from None
    except TypeError as e:
        raise ConfigError(f"model.changes: {e}") from None


def _divides(key: str, value: int, what: str, n: int) -> None:
    if n % value:
        raise ConfigError(f"{key}: {value} does not divide {what} ({n})")


def check_layout(cfg: TrainConfig, preset: ModelPreset, nodes: int | None = None, gpus_per_node: int | None = None,
                 world: int | None = None) -> tuple[Layout, int, list[str]]:
    """The layout of the run and its micro-batches per step; ConfigError naming the key otherwise.

    ``world``: the processes of a launch (the real run); else ``nodes x gpus_per_node`` (the dry
    run; by default the fewest GPUs that hold one model replica).
    """
    m, t = cfg.model, cfg.train
    notes = []
    for key, v in (("model.tp", m.tp), ("model.pp", m.pp), ("model.cp", m.cp),
                   ("train.micro_batch_size", t.micro_batch_size), ("train.global_batch_size", t.global_batch_size),
                   ("train.seq_length", t.seq_length)):
        if v < 1:
            raise ConfigError(f"{key}: must be at least 1, got {v}")
    if m.vpp is not None and m.vpp < 1:
        raise ConfigError(f"model.vpp: must be at least 1, got {m.vpp}")
    vpp = m.vpp or 1
    for what, n in family_of(preset).tp_divides(preset):
        _divides("model.tp", m.tp, f"{what} of {preset.name}", n)
    if vpp > 1 and m.pp < 2:
        raise ConfigError(f"model.vpp: virtual stages ({vpp}) need model.pp > 1")
    key = "model.vpp" if vpp > 1 else "model.pp"
    _divides(key, m.pp * vpp, f"the layers of {preset.name} (model.pp x model.vpp = {m.pp * vpp})"
             if vpp > 1 else f"the layers of {preset.name}", preset.num_layers)
    if m.sequence_parallel and m.tp == 1:
        notes.append("model.sequence_parallel has no effect at model.tp 1")
    if m.sequence_parallel and m.tp > 1 and t.seq_length % m.tp:
        raise ConfigError(f"train.seq_length: {t.seq_length} is not divisible by model.tp {m.tp} "
                          "(sequence parallelism)")
    if m.cp > 1 and t.seq_length % (2 * m.cp):
        raise ConfigError(f"train.seq_length: {t.seq_length} is not divisible by 2 x model.cp = {2 * m.cp}")
    mp = m.tp * m.pp * m.cp
    if world is not None:
        n, g, where = 1, world, "the processes of this launch"
    else:
        # default: the smallest allocation of the layout, data-parallel size 1
        g = gpus_per_node or min(mp, DEFAULT_GPUS_PER_NODE)
        n = nodes if nodes is not None else max(1, math.ceil(mp / g))
        where = f"--nodes {n} x --gpus-per-node {g}"
        if m.tp > g:
            notes.append(f"model.tp {m.tp} spans nodes ({g} GPUs per node): TP traffic leaves NVLink")
    if (n * g) % mp:
        raise ConfigError(f"model.tp x model.pp x model.cp: {mp} does not divide the world of {n * g} GPUs ({where})")
    dp = n * g // mp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size "
                          f"{t.micro_batch_size} x data-parallel size {dp}")
    n_mb = t.global_batch_size // (t.micro_batch_size * dp)
    if vpp > 1 and n_mb % m.pp:
        raise ConfigError(f"train.global_batch_size: {n_mb} micro-batches per step is not a multiple of model.pp "
                          f"{m.pp}, as the interleaved (virtual-stage) schedule needs")
    if m.pp > 1 and n_mb < m.pp:
        notes.append(f"{n_mb} micro-batches per step < model.pp {m.pp}: the pipeline never fills")
    return Layout(m.tp, m.pp, vpp, m.cp, dp, n, g), n_mb, notes


def check_loaded_model(load: str, preset: ModelPreset, preset_name: str) -> None:
    """The model a starting checkpoint was converted or trained as must compute what the config builds.

    Dist checkpoints catch shape mismatches, not a rope scaling, rope theta or norm epsilon that
    differs: a checkpoint converted from HF (its ``apriel_model.yaml`` keeps the preset of the HF
    config, rope scaling included) trained under another preset would silently train a different
    model. Checkpoints without that file are not checked.
    """
    if not any((folder / MODEL_META).is_file() for folder in (Path(load), Path(load).parent)):
        return
    try:
        stored, _ = read_model_meta(load)
    except ConversionError as e:
        raise ConfigError(f"checkpoint.load: {e}") from None
    diffs = stored.function_differences(preset)
    if diffs:
        raise ConfigError(f"checkpoint.load {load}: its {MODEL_META} describes another model than model.preset "
                          f"{preset_name} (+ model.changes): {'; '.join(diffs)} (checkpoint vs config)")


def check_files(cfg: TrainConfig, blend: Optional[BlendSpec], load: Optional[str], preset: ModelPreset,
                resumes: bool) -> list[str]:
    """Data and checkpoint paths as training reads them; lines describing the data.

    A starting checkpoint that exists is compared with the config first: a checkpoint of another model
    is the more basic mistake, and its message names every differing field, which a missing data file
    would hide. Missing paths are named in the order data, then checkpoint."""
    lines = []
    if load and not resumes and os.path.exists(load):
        check_loaded_model(load, preset, cfg.model.preset)
    if blend is not None:
        infos = blend_weights(blend)  # every prefix's .bin/.idx read, a ConfigError naming it otherwise
        need = train_samples_for(blend, cfg.train.global_batch_size) * resolve_stage(blend).seq_length
        for source in dict.fromkeys(i.source for i in infos):
            mine = [i for i in infos if i.source == source]
            have, share = sum(i.tokens for i in mine), sum(i.weight for i in mine)
            epochs = need * share / have
            above = epochs > blend.repeat_warning
            warn = f"  (above data.blend.repeat_warning {blend.repeat_warning:g})" if above else ""
            lines.append(f"data: source {source!r}: {have:,d} tokens on disk, {share:.1%} of {need:,d} "
                         f"-> {epochs:.2f} epochs{warn}")
    else:
        for key in ("prefix", "blend"):
            value = cfg.data.factory_args.get(key)
            if isinstance(value, str) and not (os.path.exists(value) or glob.glob(glob.escape(value) + "*")):
                raise ConfigError(f"data.factory_args.{key}: nothing at {value!r}")
        lines.append(f"data: {cfg.data.factory} with {cfg.data.factory_args}")
    if resumes:
        lines.append(f"checkpoint.save: {cfg.checkpoint.save} holds a checkpoint: the run resumes it")
    elif load and not os.path.exists(load):
        raise ConfigError(f"checkpoint.load: {load} does not exist")
    return lines


def launch_world_size() -> int:
    """The processes of this launch (torchrun's WORLD_SIZE, srun's SLURM_NTASKS), read before they meet."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return detect_launcher()[2]


def make_plan(cfg: TrainConfig, world: int | None = None, nodes: int | None = None,
              gpus_per_node: int | None = None, files: bool = True, device: str | None = None) -> RunPlan:
    """Decide the run of ``cfg``; ConfigError naming the key at fault otherwise (no process group needed).

    The real run passes its ``world`` (:func:`launch_world_size`) and no ``device`` (the config's
    ``model.device`` is resolved here, with the Transformer Engine and FP8 checks of this machine);
    the dry run passes ``nodes``/``gpus_per_node`` and ``device="cuda"``, the cluster it plans for.
    ``files=False`` leaves data and checkpoint paths unread (a dry run away from the cluster's disks).
    """
    m, t, ck = cfg.model, cfg.train, cfg.checkpoint
    preset = preset_of(cfg)
    family = family_of(preset)
    unknown = [g for g in t.freeze if g not in family.freeze_groups]
    if unknown:
        raise ConfigError(f"train.freeze: {unknown[0]!r} is not a part of {preset.name} (a {family.name} model: "
                          f"{', '.join(family.freeze_groups)})")
    if t.train_iters < 0:
        raise ConfigError(f"train.train_iters: must be at least 0, got {t.train_iters}")
    if cfg.data.kind == "blend" and not cfg.data.blend:
        raise ConfigError("data.blend: the config names no training data (give a data.blend spec, or "
                          "data.kind: dataset with a data.factory)")
    blend = blend_spec_of(cfg) if cfg.data.kind == "blend" else None
    layout, n_mb, notes = check_layout(cfg, preset, nodes, gpus_per_node, world)

    planning = device is not None  # the dry run: plans for a GPU cluster from elsewhere
    if not planning:
        try:
            device = resolve_device(m.device)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"model.device: {e}") from None
    try:
        use_te = should_use_te(device, m.use_te) if not planning else bool(m.use_te)
    except RuntimeError as e:
        raise ConfigError(f"model.use_te: {e}") from None
    fp8 = float8.normalize(m.fp8)  # checked at load: a known value
    if not planning:
        try:
            fp8 = check_fp8(m.fp8, device)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"model.fp8: {e}") from None
    if float8.torchao_recipe(fp8) and family.has_images:
        raise ConfigError(f"model.fp8: {fp8} is not available for the multimodal model yet (use te-hybrid or none)")
    if not planning:
        if m.cp > 1 and not use_te:
            raise ConfigError("model.cp: > 1 needs Transformer Engine's attention on a GPU "
                              "(the local SDPA spec has no CP)")
    elif m.cp > 1:
        notes.append("model.cp > 1 needs Transformer Engine's attention (GPU)")
    fusions = torch_fusions.parse(m.torch_fusions) if not use_te else ()
    transformer_args = dict(
        tp=m.tp, pp=m.pp, vpp=m.vpp, cp=m.cp, sequence_parallel=m.sequence_parallel,
        params_dtype=torch.bfloat16 if m.bf16 else torch.float32, bf16=m.bf16, fp8=float8.te_format(fp8),
        fp8_recipe=m.fp8_recipe, recompute=m.recompute, recompute_num_layers=m.recompute_num_layers,
        device=device, use_te=use_te, deterministic_mode=m.deterministic, torch_fusions=fusions)

    resumes = bool(ck.save and read_latest(ck.save) is not None)
    load = ck.load or (stage_checkpoint(blend) if blend is not None else None)
    lines = check_files(cfg, blend, load, preset, resumes) if files else []
    return RunPlan(cfg, preset, family, blend, load, resumes, layout, n_mb, device, use_te, fusions,
                   transformer_args, notes, lines, fp8=fp8)
