"""The training loop for every stage (upscale-training, CPT, SFT) on megatron-core.

``python -m megatron_apriel.train --config examples/<model>/<stage>.yaml [key=value ...]``

megatron-core does the work: GPTModel chunks (TP/PP/VPP/CP), DistributedDataParallel, the
(distributed) AdamW optimizer, OptimizerParamScheduler, the pipeline schedules and
dist_checkpointing. This module wires them together and adds what Megatron-LM's ``training.py``
adds: the data sampler, resume, signals, retention and logging.

Exit codes: 0 = finished; 3 = checkpointed after SIGTERM/SIGUSR1 or ``train.exit_interval``
(requeue the job, it resumes from the checkpoint); 2 = bad config; 1 = error.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import torch

from megatron_apriel.config import ConfigError, dump_config, from_dict, load_config, to_dict
from megatron_apriel.training.config import TrainConfig

EXIT_REQUEUE = 3


class PretrainingSampler:
    """Megatron-LM's MegatronPretrainingSampler (megatron/training, not in megatron-core).

    Yields this DP rank's indices of each micro-batch, in dataset order from ``consumed_samples``:
    a resumed run reads exactly the samples an uninterrupted run would have read next.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self):
        return self.total

    def __iter__(self):
        group = self.mbs * self.dp_size
        start = self.dp_rank * self.mbs
        for first in range(self.consumed, self.total - group + 1, group):
            yield list(range(first + start, first + start + self.mbs))


class SyntheticDataset(torch.utils.data.Dataset):
    """A learnable corpus without files, for the tiny example configs and smoke tests.

    Sample i is an arithmetic progression modulo ``vocab`` (start and stride drawn from ``seed`` and
    i): the next token follows from the previous two, so a tiny model's loss falls within steps.
    """

    def __init__(self, seq_length: int, num_samples: int = 4096, vocab: int = 500, seed: int = 0,
                 max_stride: int = 7, masked_fraction: float = 0.0):
        self.s, self.n, self.vocab, self.seed = seq_length, num_samples, vocab, seed
        self.max_stride, self.masked_fraction = max_stride, masked_fraction

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, self.vocab, (1,), generator=g))
        stride = int(torch.randint(1, self.max_stride + 1, (1,), generator=g))
        seq = (start + stride * torch.arange(self.s + 1)) % self.vocab
        mask = torch.ones(self.s)
        if self.masked_fraction:  # a prompt-like prefix without loss, as in SFT
            mask[: int(self.s * self.masked_fraction)] = 0
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": mask, "position_ids": torch.arange(self.s)}


class SyntheticImageTextDataset(torch.utils.data.Dataset):
    """Image-caption samples without files, for the tiny multimodal configs and tests.

    Each image is a flat colour (class c of ``classes``, plus noise) of a size drawn from ``sizes``;
    its caption token is ``caption_base + c``, so only the image tells the model what comes next.
    Placeholders are laid out as PixtralProcessor writes them; the rest of the row is the arithmetic
    progression of :class:`SyntheticDataset`. ``loss_on_text=False`` trains on the captions only
    (response-only loss, as in CPT stage 2). Items and :meth:`collate` follow the batch contract of
    :mod:`megatron_apriel.models.llava`.
    """

    def __init__(self, seq_length: int, num_samples: int = 1024, seed: int = 0, preset: str = "tiny-llava",
                 sizes=((8, 8), (8, 12), (12, 8)), images_per_sample: int = 1, classes: int = 8,
                 caption_base: int = 100, vocab: int = 500, loss_on_text: bool = True):
        from megatron_apriel.models import get_preset

        self.s, self.n, self.seed = seq_length, num_samples, seed
        self.vision = get_preset(preset).vision
        self.sizes, self.k, self.classes = [tuple(x) for x in sizes], images_per_sample, classes
        self.caption_base, self.vocab, self.loss_on_text = caption_base, vocab, loss_on_text

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> dict:
        v, g = self.vision, torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        seq, trained, pixels, sizes = [1], [False], [], []
        for _ in range(self.k):
            h, w = self.sizes[int(torch.randint(0, len(self.sizes), (1,), generator=g))]
            c = int(torch.randint(0, self.classes, (1,), generator=g))
            pixels.append(torch.full((3, h, w), 2.0 * c / self.classes - 1.0) + 0.1 * torch.randn(3, h, w, generator=g))
            sizes.append((h, w))
            for r in range(h // v.patch_size):
                seq += [v.image_token_id] * (w // v.patch_size)
                seq.append(v.image_end_token_id if r == h // v.patch_size - 1 else v.image_break_token_id)
            trained += [False] * (len(seq) - len(trained))
            seq.append(self.caption_base + c)
            trained.append(True)
        if len(seq) > self.s:
            raise ValueError(f"seq_length {self.s} is too short for {self.k} image(s) of up to {max(sizes)} pixels")
        start = int(torch.randint(0, self.vocab, (1,), generator=g))
        stride = int(torch.randint(1, 8, (1,), generator=g))
        rest = self.s + 1 - len(seq)
        # Text stays clear of the control and image ids (< 20) that the image placeholders use.
        seq += (20 + (start + stride * torch.arange(rest)) % (self.vocab - 20)).tolist()
        trained += [self.loss_on_text] * rest
        seq = torch.tensor(seq)
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": torch.tensor(trained[1:], dtype=torch.float32),
                "position_ids": torch.arange(self.s), "pixel_values": pixels,
                "image_sizes": torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)}

    @staticmethod
    def collate(items) -> dict:
        """[b, s] text tensors; every row's images in order, zero-padded to one [N, 3, H, W]."""
        batch = {k: torch.stack([it[k] for it in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        images = [im for it in items for im in it["pixel_values"]]
        batch["image_sizes"] = torch.cat([it["image_sizes"] for it in items])
        h, w = max((im.shape[1] for im in images), default=0), max((im.shape[2] for im in images), default=0)
        batch["pixel_values"] = torch.zeros(len(images), 3, h, w)
        for j, im in enumerate(images):
            batch["pixel_values"][j, :, : im.shape[1], : im.shape[2]] = im
        return batch


def build_datasets_from_config(cfg: TrainConfig, train_samples: int, valid_samples: int):
    """(train, valid or None) datasets of GPTDataset-like dict items; the one place data is made."""
    data = cfg.data
    if data.kind == "blend":
        from megatron_apriel.data.blends import build_datasets

        spec = _blend_spec(cfg)
        return build_datasets(spec, cfg.train.global_batch_size, train_samples=train_samples,
                              valid_samples=valid_samples, eod_token=data.eod_token)
    import importlib

    module, _, name = data.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.factory: cannot import {data.factory!r}: {e}") from None
    common = dict(seq_length=cfg.train.seq_length)
    train = factory(**data.factory_args, **common)
    valid = factory(**data.valid_factory_args, **common) if data.valid_factory_args else None
    if isinstance(train, tuple):
        train, valid = train
    return train, valid


def build_named_valid_sets(cfg: TrainConfig, valid_samples: int) -> dict:
    """``data.valid_sets`` / ``data.valid_per_source`` as {name: dataset}, each evaluated apart."""
    data = cfg.data
    if data.valid_per_source:
        import dataclasses

        from megatron_apriel.data.blends import build_datasets, resolve_stage

        spec = resolve_stage(_blend_spec(cfg))
        out = {}
        for src in spec.sources:
            one = dataclasses.replace(spec, sources=[dataclasses.replace(src, weight=1.0)], stages=[], stage=None)
            _, out[src.name] = build_datasets(one, cfg.train.global_batch_size, cfg.train.global_batch_size,
                                              valid_samples=valid_samples, eod_token=data.eod_token)
        return out
    if not data.valid_sets:
        return {}
    import importlib

    module, _, name = data.factory.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return {n: factory(**args, seq_length=cfg.train.seq_length) for n, args in data.valid_sets.items()}


def _blend_dict(blend) -> dict:
    """``data.blend`` inline, or the path of a blend YAML (examples/<model>/cpt_blend.yaml)."""
    if isinstance(blend, str):
        from megatron_apriel.config import load_yaml

        return load_yaml(blend)
    if not isinstance(blend, dict):
        raise ConfigError(f"data.blend: expected a mapping or a YAML path, got {blend!r}")
    return dict(blend)


def _stage_load(cfg: TrainConfig) -> Optional[str]:
    """The starting checkpoint a blend stage names (``stages[].load``), when checkpoint.load is unset."""
    if cfg.data.kind != "blend":
        return None
    from megatron_apriel.data.blends import stage_checkpoint

    return stage_checkpoint(_blend_spec(cfg))


def _blend_spec(cfg: TrainConfig):
    from megatron_apriel.data.blends import BlendSpec

    blend = _blend_dict(cfg.data.blend)
    blend.setdefault("seq_length", cfg.train.seq_length)
    if blend.get("tokens") is None and blend.get("steps") is None:
        blend["steps"] = max(cfg.train.train_iters, 1)  # no budget given: train.train_iters
    spec = from_dict(BlendSpec, blend, "data.blend")
    if spec.seq_length != cfg.train.seq_length:
        raise ConfigError(f"data.blend.seq_length {spec.seq_length} != train.seq_length {cfg.train.seq_length}")
    return spec


def _check_loaded_model(load: str, preset, preset_name: str) -> None:
    """The model a starting checkpoint was converted or trained as must compute what the config builds.

    Dist checkpoints catch shape mismatches, not a rope scaling, rope theta or norm epsilon that
    differs: a checkpoint converted from HF (its ``apriel_model.yaml`` keeps the preset of the HF
    config, rope scaling included) trained under another preset would silently train a different
    model. Checkpoints without that file are not checked.
    """
    from megatron_apriel.checkpoint.dcp_io import MODEL_META, ConversionError, read_model_meta

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


def _device_of(env) -> str:
    return "cuda" if env.device == "cuda" else "cpu"


IMAGE_KEYS = ("pixel_values", "image_sizes")  # the multimodal batch (models/llava.py)


class _Batches:
    """Micro-batches of one global batch from a DataLoader, moved to the device (packed ones flattened)."""

    def __init__(self, loader, device: str, cp: int = 1):
        self.it = iter(loader)
        self.device = device
        self.cp = cp

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            batch = next(self.it)
            if "cu_seqlens" in batch:
                from megatron_apriel.data.packing import flatten_packed_batch

                # Flattening rows keeps the images' order (row 0 first), so they travel unchanged.
                batch = {**flatten_packed_batch(batch), **{k: batch[k] for k in IMAGE_KEYS if k in batch}}
            item = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                    for k, v in batch.items() if k in ("tokens", "labels", "loss_mask", "position_ids") + IMAGE_KEYS}
            if batch.get("packed_seq_params") is not None:
                p = batch["packed_seq_params"]
                for f in ("cu_seqlens_q", "cu_seqlens_kv"):
                    setattr(p, f, getattr(p, f).to(self.device))
                item["packed_seq_params"] = p
            elif self.cp > 1:  # this CP rank's two sequence chunks (load-balanced causal split)
                from megatron.core.utils import get_batch_on_this_cp_rank

                item = get_batch_on_this_cp_rank(item)
            out.append(item)
        return out


def _loader(dataset, consumed: int, mbs: int, num_workers: int):
    from megatron.core import parallel_state as ps

    sampler = PretrainingSampler(len(dataset), consumed, mbs, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False,
                                       collate_fn=getattr(dataset, "collate", None))


def build_scheduler(optimizer, cfg: TrainConfig):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t, s, o = cfg.train, cfg.train.schedule, cfg.train.optim
    decay = max(s.decay_iters or t.train_iters, s.warmup_iters + 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=s.init_lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=s.warmup_iters,
        lr_decay_steps=decay, lr_decay_style=s.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(t.train_iters, 1), wd_incr_style="constant",
        wsd_decay_steps=s.wsd_decay_iters, lr_wsd_decay_style=s.wsd_decay_style,
    )


class _StopFlag:
    """SIGTERM/SIGUSR1 set a flag; the loop acts on it at the next step boundary on every rank."""

    def __init__(self):
        self.signalled = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signalled = signum

    def any_rank(self, device: str) -> bool:
        flag = torch.tensor([1 if self.signalled else 0], dtype=torch.int32, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _log0(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def train(cfg: TrainConfig) -> int:
    from megatron.core import parallel_state as ps

    from megatron_apriel.models import get_preset
    from megatron_apriel.models.builder import build_model_chunks, check_fp8, should_use_te
    from megatron_apriel.models.flops import flops_per_token, peak_flops
    from megatron_apriel.runtime import init_distributed
    from megatron_apriel.training.checkpointing import Checkpointer, read_latest
    from megatron_apriel.training.freeze import freeze_groups
    from megatron_apriel.training.metrics import MetricsWriter, Throughput, format_duration
    from megatron_apriel.training.optimizer import build_optimizer, wrap_ddp
    from megatron_apriel.training.step import eval_step, train_step

    m, t, ck, lg = cfg.model, cfg.train, cfg.checkpoint, cfg.logging
    # Before anything slow: a SLURM time-limit signal arriving during start-up (rendezvous, model
    # build, checkpoint load) must not kill the job; it is acted on at the first step boundary.
    stop = _StopFlag()
    if m.deterministic:
        # cuBLAS reads this when its first handle is made, i.e. before the first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    env = init_distributed(tp=m.tp, pp=m.pp, cp=m.cp, vpp=m.vpp, device=m.device, seed=t.seed)
    device = _device_of(env)
    _log0(f"distributed: backend {torch.distributed.get_backend()}, world {env.world_size}, device {env.device}")
    check_fp8(m.fp8, env.device)
    if m.cp > 1 and not should_use_te(env.device, m.use_te):
        raise ConfigError("model.cp > 1 needs Transformer Engine's attention on a GPU (the local SDPA spec has no CP)")
    dp = ps.get_data_parallel_world_size()
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                          f"micro_batch_size {t.micro_batch_size} x data-parallel size {dp}")
    n_mb = t.global_batch_size // (t.micro_batch_size * dp)
    _log0("config:\n" + __import__("yaml").safe_dump(to_dict(cfg), sort_keys=False))

    preset = get_preset(m.preset, **m.changes)
    load = ck.load or _stage_load(cfg)
    if load and not (ck.save and read_latest(ck.save) is not None):
        _check_loaded_model(load, preset, m.preset)
    use_te = should_use_te(env.device, m.use_te)
    tcfg = preset.transformer_config(
        tp=m.tp, pp=m.pp, vpp=m.vpp, cp=m.cp, sequence_parallel=m.sequence_parallel,
        params_dtype=torch.bfloat16 if m.bf16 else torch.float32, bf16=m.bf16, fp8=m.fp8,
        fp8_recipe=m.fp8_recipe, recompute=m.recompute, recompute_num_layers=m.recompute_num_layers,
        device=env.device, use_te=use_te, deterministic_mode=m.deterministic)
    build = build_model_chunks
    if preset.vision is not None:  # Pixtral/LLaVA: vision encoder + projector + the decoder
        from megatron_apriel.models.llava import build_llava_chunks as build
    chunks = build(preset, tcfg, use_te, max_sequence_length=max(t.seq_length, 4096))
    frozen = freeze_groups(chunks, t.freeze)
    if frozen:
        _log0(f"frozen {t.freeze}: {frozen} parameters on this rank")
    ddp = wrap_ddp(chunks, tcfg, t.optim)
    optimizer = build_optimizer(ddp, tcfg, t.optim)
    scheduler = build_scheduler(optimizer, cfg)

    checkpointer = Checkpointer(ck.save, ck.keep_last, ck.keep_every, ck.async_save,
                                distributed_optimizer=t.optim.use_distributed_optimizer,
                                optimizer_format=ck.optimizer_format,
                                write_config=lambda p: dump_config(cfg, p), log=_log0)
    if ck.save and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        from megatron_apriel.checkpoint.dcp_io import write_model_meta

        # the model description beside the iter_* folders: `apriel convert mcore-to-hf --ckpt <save>`
        # and the averaging tool then need no --preset
        os.makedirs(ck.save, exist_ok=True)
        write_model_meta(ck.save, preset, torch.bfloat16 if m.bf16 else torch.float32)
    iteration, consumed = 0, 0
    if ck.save and read_latest(ck.save) is not None:
        # A complete checkpoint of this run (requeue, crash): always a full resume.
        iteration, consumed = checkpointer.load(ck.save, ddp, optimizer, scheduler, mode="full")
    elif load:
        mode = "full" if ck.load_mode == "full" else "weights"
        iteration, consumed = checkpointer.load(load, ddp, optimizer, scheduler, mode=mode)
        if mode == "weights":
            optimizer.reload_model_params()  # the optimizer's main params are copies made at build time

    train_samples = t.train_iters * t.global_batch_size
    valid_samples = lg.eval_iters * t.global_batch_size if lg.eval_interval else 0
    train_ds = valid_ds = batches = None
    named_valid: dict = {}
    if iteration < t.train_iters:  # (train_iters 0: only convert/save the starting point)
        train_ds, valid_ds = build_datasets_from_config(cfg, train_samples, valid_samples)
        if len(train_ds) < train_samples:
            raise ConfigError(f"the training data has {len(train_ds)} samples < train.train_iters x "
                              f"global_batch_size = {train_samples}")
        named_valid = build_named_valid_sets(cfg, valid_samples) if lg.eval_interval else {}
        for name, ds in [("", valid_ds), *named_valid.items()]:
            if ds is not None and lg.eval_interval and len(ds) < valid_samples:
                raise ConfigError(f"the validation data{f' {name!r}' if name else ''} has {len(ds)} samples < "
                                  f"logging.eval_iters x global_batch_size = {valid_samples}")
        batches = _Batches(_loader(train_ds, consumed, t.micro_batch_size, cfg.data.num_workers), device, m.cp)

    log_dir = lg.log_dir or (os.path.join(ck.save, "logs") if ck.save else None)
    writer = MetricsWriter(log_dir, to_dict(cfg), lg.wandb_project, lg.wandb_run_name, lg.wandb_mode)
    peak = lg.peak_tflops * 1e12 if lg.peak_tflops is not None else (peak_flops() if env.device == "cuda" else None)
    tokens_per_step = t.global_batch_size * t.seq_length
    meter = Throughput(flops_per_token(preset, t.seq_length), tokens_per_step, env.world_size, peak)

    packed = train_ds is not None and "cu_seqlens" in train_ds[0]
    seq, mbs = (t.seq_length * t.micro_batch_size, 1) if packed else (t.seq_length, t.micro_batch_size)

    def valid_loss(ds) -> float:
        vb = _Batches(_loader(ds, 0, t.micro_batch_size, 0), device, m.cp)
        total, n = 0.0, 0
        for _ in range(lg.eval_iters):
            mb = vb.take(n_mb)
            r = eval_step(ddp, [iter(mb) for _ in ddp] if len(ddp) > 1 else iter(mb), n_mb, seq, mbs)
            total += r.loss * r.num_tokens
            n += r.num_tokens
        return total / max(n, 1)

    def run_eval(step: int) -> None:
        if valid_ds is not None:
            loss = valid_loss(valid_ds)
            _log0(f"validation at step {step}: loss {loss:.6f} ppl {math.exp(min(loss, 30)):.3f}")
            writer.scalars(step, {"valid/loss": loss})
            writer.record({"iteration": step, "valid_loss": loss})
        for name, ds in named_valid.items():  # one line per named set (per blend source)
            loss = valid_loss(ds)
            _log0(f"validation {name!r} at step {step}: loss {loss:.6f} ppl {math.exp(min(loss, 30)):.3f}")
            writer.scalars(step, {f"valid/{name}/loss": loss})
            writer.record({"iteration": step, f"valid_loss/{name}": loss})

    exit_code = 0
    last_saved = None
    _log0(f"training from iteration {iteration} to {t.train_iters}: {n_mb} micro-batches x {t.micro_batch_size} "
          f"per DP rank, DP={dp} TP={m.tp} PP={m.pp} CP={m.cp}")
    while iteration < t.train_iters:
        mb = batches.take(n_mb)
        result = train_step(ddp, optimizer, [iter(mb) for _ in ddp] if len(ddp) > 1 else iter(mb), n_mb, seq, mbs)
        scheduler.step(increment=1)
        iteration += 1
        consumed += t.global_batch_size
        meter.tick()
        lr = optimizer.param_groups[0]["lr"]
        writer.record({"iteration": iteration, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                       "tokens": result.num_tokens, "consumed_samples": consumed})
        if iteration % lg.log_interval == 0 or iteration == t.train_iters:
            r = meter.read(t.train_iters - iteration)
            gn = f"{result.grad_norm:.4f}" if result.grad_norm is not None else "n/a"
            mfu = f" | MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
            _log0(f"step {iteration}/{t.train_iters} | consumed tokens {consumed * t.seq_length} | loss {result.loss:.6f} "
                  f"| lr {lr:.3e} | grad norm {gn} | step {r['step_time'] * 1000:.0f} ms "
                  f"| {r['tokens_per_s_per_gpu']:.0f} tok/s/GPU{mfu} | ETA {format_duration(r['eta_s'])}")
            writer.scalars(iteration, {"train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                                       "perf/tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"], "perf/mfu": r["mfu"],
                                       "train/consumed_tokens": consumed * t.seq_length})
        if lg.eval_interval and iteration % lg.eval_interval == 0:
            run_eval(iteration)
        checkpointer.finalize(blocking=False)
        stopping = stop.any_rank(device) or (t.exit_interval is not None and iteration % t.exit_interval == 0
                                             and iteration < t.train_iters)
        if stopping or (ck.save_interval and iteration % ck.save_interval == 0):
            checkpointer.save(iteration, ddp, optimizer, scheduler, consumed)
            last_saved = iteration
        if stopping:
            _log0(f"stopping at iteration {iteration} ({'signal' if stop.signalled else 'exit_interval'}): "
                  f"checkpointed, exit code {EXIT_REQUEUE}")
            exit_code = EXIT_REQUEUE
            break
    if exit_code == 0 and ck.save and last_saved != iteration:
        checkpointer.save(iteration, ddp, optimizer, scheduler, consumed)
    checkpointer.close()
    writer.close()
    _log0(f"done: iteration {iteration}, consumed samples {consumed}, exit code {exit_code}")
    return exit_code


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="apriel train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (examples/<model>/<stage>.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.optim.lr=1e-5")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the config and build every rank position of its layout on the meta device, no GPU")
    ap.add_argument("--nodes", type=int, help="with --dry-run: nodes of the allocation (default: the fewest that fit)")
    ap.add_argument("--gpus-per-node", type=int, help="with --dry-run: GPUs per node (default 8)")
    ap.add_argument("--no-files", action="store_true", help="with --dry-run: do not check data and checkpoint paths")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="with --dry-run: warn above this per GPU (H100: 80)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if args.dry_run:
            from megatron_apriel.training.dry_run import dry_run

            dry_run(cfg, args.nodes, args.gpus_per_node, files=not args.no_files, gpu_memory_gib=args.gpu_memory_gib)
            return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        code = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_apriel.runtime import destroy_distributed

    destroy_distributed()
    return code
