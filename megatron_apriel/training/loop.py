"""The training loop for every stage (upscale-training, CPT, SFT) on megatron-core.

``python -m megatron_apriel.train --config examples/<model>/<stage>.yaml [key=value ...]``

megatron-core does the work: GPTModel chunks (TP/PP/VPP/CP), DistributedDataParallel, the
(distributed) AdamW optimizer, OptimizerParamScheduler, the pipeline schedules and
dist_checkpointing. This module wires them together and adds what Megatron-LM's ``training.py``
adds: the data sampler, resume, signals, retention and logging.

Exit codes: 0 = finished; 3 = checkpointed after SIGTERM/SIGUSR1 or ``train.exit_interval``
(requeue the job, it resumes from the checkpoint); 4 = a phase overran its ``fault.*_timeout``
(training/fault.py: stacks and culprit ranks in the log; requeue); 2 = bad config; 1 = error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Optional

import torch
import yaml
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_apriel.checkpoint.dcp_io import write_model_meta
from megatron_apriel.config import ConfigError, dump_config, load_config, to_dict
from megatron_apriel.data.blends import build_datasets, resolve_stage
from megatron_apriel.data.registry import resolve_dataset
from megatron_apriel.data.synthetic import SyntheticDataset, SyntheticImageTextDataset  # noqa: F401 (older configs name them here)
from megatron_apriel.errors import EXIT_OK, EXIT_REQUEUE, cli_main
from megatron_apriel.models import torch_fusions
from megatron_apriel.models.flops import flops_per_token, peak_flops
from megatron_apriel.runtime import destroy_distributed, init_distributed
from megatron_apriel.runtime.log import is_rank0, log0
from megatron_apriel.training.checkpointing import Checkpointer
from megatron_apriel.training.config import TrainConfig, blend_spec_of
from megatron_apriel.training.data_loader import Batches, batches
from megatron_apriel.training.dry_run import dry_run
from megatron_apriel.training.fault import Faults, close_all, process_group_timeout_minutes
from megatron_apriel.training.freeze import freeze_groups
from megatron_apriel.training.metrics import MetricsWriter, Throughput, format_duration
from megatron_apriel.training.optimizer import build_optimizer, wrap_ddp
from megatron_apriel.training.plan import RunPlan, launch_world_size, make_plan
from megatron_apriel.training.step import eval_step, train_step


def build_datasets_from_config(cfg: TrainConfig, train_samples: int, valid_samples: int, blend=None):
    """(train, valid or None) datasets of GPTDataset-like dict items; the one place data is made.

    ``blend``: the plan's parsed ``data.blend`` (parsed here when not given)."""
    data = cfg.data
    if data.kind == "blend":
        spec = blend if blend is not None else blend_spec_of(cfg)
        return build_datasets(spec, cfg.train.global_batch_size, train_samples=train_samples,
                              valid_samples=valid_samples, eod_token=data.eod_token)
    factory = resolve_dataset(data.factory)
    common = dict(seq_length=cfg.train.seq_length)
    train = factory(**data.factory_args, **common)
    valid = factory(**data.valid_factory_args, **common) if data.valid_factory_args else None
    if isinstance(train, tuple):
        train, valid = train
    return train, valid


def build_named_valid_sets(cfg: TrainConfig, valid_samples: int, blend=None) -> dict:
    """``data.valid_sets`` / ``data.valid_per_source`` as {name: dataset}, each evaluated apart."""
    data = cfg.data
    if data.valid_per_source:
        spec = resolve_stage(blend if blend is not None else blend_spec_of(cfg))
        out = {}
        for src in spec.sources:
            one = dataclasses.replace(spec, sources=[dataclasses.replace(src, weight=1.0)], stages=[], stage=None)
            _, out[src.name] = build_datasets(one, cfg.train.global_batch_size, cfg.train.global_batch_size,
                                              valid_samples=valid_samples, eod_token=data.eod_token)
        return out
    if not data.valid_sets:
        return {}
    factory = resolve_dataset(data.factory)
    return {n: factory(**args, seq_length=cfg.train.seq_length) for n, args in data.valid_sets.items()}


def _device_of(env) -> str:
    return "cuda" if env.device == "cuda" else "cpu"


def build_scheduler(optimizer, cfg: TrainConfig):
    t, s, o = cfg.train, cfg.train.schedule, cfg.train.optim
    decay = max(s.decay_iters or t.train_iters, s.warmup_iters + 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=s.init_lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=s.warmup_iters,
        lr_decay_steps=decay, lr_decay_style=s.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(t.train_iters, 1), wd_incr_style="constant",
        wsd_decay_steps=s.wsd_decay_iters, lr_wsd_decay_style=s.wsd_decay_style,
    )


class StopFlag:
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


@dataclass
class TrainState:
    """Everything :func:`build` makes and :func:`run` steps: the model, its optimizer and data."""

    cfg: TrainConfig
    stop: StopFlag
    device: str
    world_size: int
    dp: int
    n_mb: int  # micro-batches per DP rank per step
    ddp: list
    optimizer: object
    scheduler: object
    checkpointer: Checkpointer
    writer: MetricsWriter
    meter: Throughput
    faults: Optional[Faults] = None
    iteration: int = 0
    consumed: int = 0
    train_ds: object = None
    valid_ds: object = None
    named_valid: dict = field(default_factory=dict)
    batches: Optional[Batches] = None
    seq: int = 0  # sequence length and micro-batch size the step sees (packed rows: one flat row)
    mbs: int = 0


def build(plan: RunPlan | TrainConfig) -> TrainState:
    """Distributed start-up, model, optimizer, resume and data of a plan; ready to :func:`run`."""
    if isinstance(plan, TrainConfig):
        plan = make_plan(plan, world=launch_world_size())
    cfg, preset = plan.cfg, plan.preset
    m, t, ck, lg = cfg.model, cfg.train, cfg.checkpoint, cfg.logging
    # Before anything slow: a SLURM time-limit signal arriving during start-up (rendezvous, model
    # build, checkpoint load) must not kill the job; it is acted on at the first step boundary.
    stop = StopFlag()
    # the watchdog's start-up budget starts now; heartbeats once the process group is up
    faults = Faults(cfg.fault, ck.save, t.nan_policy, t.nan_skip_limit)
    if m.deterministic:
        # cuBLAS reads this when its first handle is made, i.e. before the first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    env = init_distributed(tp=m.tp, pp=m.pp, cp=m.cp, vpp=m.vpp, device=plan.device, seed=t.seed,
                           timeout_minutes=process_group_timeout_minutes(cfg.fault))
    faults.distributed_ready()
    device = _device_of(env)
    log0(f"distributed: backend {torch.distributed.get_backend()}, world {env.world_size}, device {env.device}")
    dp = ps.get_data_parallel_world_size()
    assert dp == plan.layout.dp, (dp, plan.layout)  # megatron-core's groups are the plan's
    n_mb = plan.microbatches
    log0("config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    for note in plan.notes:
        log0(f"note: {note}")

    load = plan.load
    # what is in effect: a fusion this torch cannot do (the wgrad GEMM's probe) stays off
    fusions = torch_fusions.install(plan.torch_fusions, env.device)
    tcfg = plan.transformer_config(torch_fusions=fusions)
    if fusions:
        log0(f"torch fusions (no TE/apex): {', '.join(fusions)}")
    fp8 = plan.fp8_build_args(tcfg)
    if fp8:
        log0(f"float8 ({plan.fp8}{', emulated' if env.device != 'cuda' else ''}): the linears of "
             f"{len(fp8['fp8_layers'])} of {tcfg.num_layers} layers")
    chunks = plan.family.build_chunks(preset, tcfg, plan.use_te, max_sequence_length=max(t.seq_length, 4096), **fp8)
    if "layer" in fusions:
        torch_fusions.compile_layers(chunks)
    frozen = freeze_groups(chunks, t.freeze)
    if frozen:
        log0(f"frozen {t.freeze}: {frozen} parameters on this rank")
    ddp = wrap_ddp(chunks, tcfg, t.optim)
    optimizer = build_optimizer(ddp, tcfg, t.optim, fused_adam="adam" in fusions)
    scheduler = build_scheduler(optimizer, cfg)

    checkpointer = Checkpointer(ck.save, ck.keep_last, ck.keep_every, ck.async_save,
                                distributed_optimizer=t.optim.use_distributed_optimizer,
                                optimizer_format=ck.optimizer_format,
                                write_config=lambda p: dump_config(cfg, p), log=log0,
                                checksum_all=cfg.fault.checksum_all)
    if ck.save and is_rank0():
        # the model description beside the iter_* folders: `apriel convert mcore-to-hf --ckpt <save>`
        # and the averaging tool then need no --preset
        os.makedirs(ck.save, exist_ok=True)
        write_model_meta(ck.save, preset, torch.bfloat16 if m.bf16 else torch.float32)
    iteration, consumed = 0, 0
    resume = faults.resume_folder() if plan.resumes else None  # the newest checkpoint that verifies
    if resume:
        # A complete checkpoint of this run (requeue, crash): always a full resume.
        faults.phase("load")
        iteration, consumed = checkpointer.load(resume, ddp, optimizer, scheduler, mode="full")
        faults.resumed(iteration)
    elif load:
        faults.phase("load")
        mode = "full" if ck.load_mode == "full" else "weights"
        iteration, consumed = checkpointer.load(load, ddp, optimizer, scheduler, mode=mode)
        if mode == "weights":
            optimizer.reload_model_params()  # the optimizer's main params are copies made at build time

    train_samples = t.train_iters * t.global_batch_size
    valid_samples = lg.eval_iters * t.global_batch_size if lg.eval_interval else 0
    train_ds = valid_ds = train_batches = None
    named_valid: dict = {}
    if iteration < t.train_iters:  # (train_iters 0: only convert/save the starting point)
        train_ds, valid_ds = build_datasets_from_config(cfg, train_samples, valid_samples, plan.blend)
        if len(train_ds) < train_samples:
            raise ConfigError(f"the training data has {len(train_ds)} samples < train.train_iters x "
                              f"global_batch_size = {train_samples}")
        named_valid = build_named_valid_sets(cfg, valid_samples, plan.blend) if lg.eval_interval else {}
        for name, ds in [("", valid_ds), *named_valid.items()]:
            if ds is not None and lg.eval_interval and len(ds) < valid_samples:
                raise ConfigError(f"the validation data{f' {name!r}' if name else ''} has {len(ds)} samples < "
                                  f"logging.eval_iters x global_batch_size = {valid_samples}")
        train_batches = batches(train_ds, consumed, t.micro_batch_size, cfg.data.num_workers, device, m.cp)

    log_dir = lg.log_dir or (os.path.join(ck.save, "logs") if ck.save else None)
    writer = MetricsWriter(log_dir, to_dict(cfg), lg.wandb_project, lg.wandb_run_name, lg.wandb_mode)
    peak = lg.peak_tflops * 1e12 if lg.peak_tflops is not None else (peak_flops() if env.device == "cuda" else None)
    tokens_per_step = t.global_batch_size * t.seq_length
    meter = Throughput(flops_per_token(preset, t.seq_length), tokens_per_step, env.world_size, peak)
    faults.install_compute_timer(ddp)

    packed = train_ds is not None and "cu_seqlens" in train_ds[0]
    seq, mbs = (t.seq_length * t.micro_batch_size, 1) if packed else (t.seq_length, t.micro_batch_size)
    return TrainState(cfg, stop, device, env.world_size, dp, n_mb, ddp, optimizer, scheduler, checkpointer, writer,
                      meter, faults, iteration, consumed, train_ds, valid_ds, named_valid, train_batches, seq, mbs)


def _valid_loss(st: TrainState, ds) -> float:
    t, lg = st.cfg.train, st.cfg.logging
    vb = batches(ds, 0, t.micro_batch_size, 0, st.device, st.cfg.model.cp)
    total, n = 0.0, 0
    for _ in range(lg.eval_iters):
        mb = vb.take(st.n_mb)
        r = eval_step(st.ddp, [iter(mb) for _ in st.ddp] if len(st.ddp) > 1 else iter(mb), st.n_mb, st.seq, st.mbs)
        total += r.loss * r.num_tokens
        n += r.num_tokens
    return total / max(n, 1)


def _run_eval(st: TrainState, step: int) -> None:
    if st.valid_ds is not None:
        loss = _valid_loss(st, st.valid_ds)
        log0(f"validation at step {step}: loss {loss:.6f} ppl {math.exp(min(loss, 30)):.3f}")
        st.writer.scalars(step, {"valid/loss": loss})
        st.writer.record({"iteration": step, "valid_loss": loss})
    for name, ds in st.named_valid.items():  # one line per named set (per blend source)
        loss = _valid_loss(st, ds)
        log0(f"validation {name!r} at step {step}: loss {loss:.6f} ppl {math.exp(min(loss, 30)):.3f}")
        st.writer.scalars(step, {f"valid/{name}/loss": loss})
        st.writer.record({"iteration": step, f"valid_loss/{name}": loss})


def run(st: TrainState) -> int:
    """Step from ``st.iteration`` to ``train.train_iters``: log, evaluate, checkpoint, stop on a
    signal or ``train.exit_interval``; returns the exit code (0 done, 3 checkpointed for requeue)."""
    cfg = st.cfg
    m, t, ck, lg = cfg.model, cfg.train, cfg.checkpoint, cfg.logging
    ddp, optimizer, scheduler, checkpointer, writer = st.ddp, st.optimizer, st.scheduler, st.checkpointer, st.writer
    faults = st.faults
    n_mb = st.n_mb
    exit_code = 0
    last_saved = None
    log0(f"training from iteration {st.iteration} to {t.train_iters}: {n_mb} micro-batches x {t.micro_batch_size} "
         f"per DP rank, DP={st.dp} TP={m.tp} PP={m.pp} CP={m.cp}")
    while st.iteration < t.train_iters:
        faults.start_step(st.iteration + 1)  # watchdog budget, drills, compute timer
        mb = st.batches.take(n_mb)
        faults.computing(st.iteration + 1)
        result = train_step(ddp, optimizer, [iter(mb) for _ in ddp] if len(ddp) > 1 else iter(mb), n_mb, st.seq, st.mbs,
                            after_backward=faults.after_backward(st.iteration + 1))
        skipped = faults.end_step(st.iteration + 1, result)  # non-finite: raises (stop) or True (skip)
        scheduler.step(increment=1)
        st.iteration += 1
        st.consumed += t.global_batch_size
        iteration, consumed = st.iteration, st.consumed
        st.meter.tick()
        lr = optimizer.param_groups[0]["lr"]
        writer.record({"iteration": iteration, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                       "tokens": result.num_tokens, "consumed_samples": consumed,
                       **({"skipped": True} if skipped else {})})
        if iteration % lg.log_interval == 0 or iteration == t.train_iters:
            r = st.meter.read(t.train_iters - iteration)
            gn = f"{result.grad_norm:.4f}" if result.grad_norm is not None else "n/a"
            mfu = f" | MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
            log0(f"step {iteration}/{t.train_iters} | consumed tokens {consumed * t.seq_length} "
                 f"| loss {result.loss:.6f} | lr {lr:.3e} | grad norm {gn} | step {r['step_time'] * 1000:.0f} ms "
                 f"| {r['tokens_per_s_per_gpu']:.0f} tok/s/GPU{mfu} | ETA {format_duration(r['eta_s'])}")
            writer.scalars(iteration, {"train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                                       "perf/tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"], "perf/mfu": r["mfu"],
                                       "train/consumed_tokens": consumed * t.seq_length})
            stragglers = faults.straggler_report(iteration)  # a collective: every rank, same steps
            if stragglers:
                named = stragglers.pop("stragglers")
                writer.scalars(iteration, stragglers)
                if named:
                    writer.record({"iteration": iteration, "stragglers": named})
        if lg.eval_interval and iteration % lg.eval_interval == 0:
            faults.phase("eval")
            _run_eval(st, iteration)
        checkpointer.finalize(blocking=False)
        stopping = st.stop.any_rank(st.device) or (t.exit_interval is not None and iteration % t.exit_interval == 0
                                                   and iteration < t.train_iters)
        if stopping or (ck.save_interval and iteration % ck.save_interval == 0):
            faults.save(checkpointer, iteration, ddp, optimizer, scheduler, consumed)
            last_saved = iteration
        if stopping:
            log0(f"stopping at iteration {iteration} ({'signal' if st.stop.signalled else 'exit_interval'}): "
                 f"checkpointed, exit code {EXIT_REQUEUE}")
            exit_code = EXIT_REQUEUE
            break
    if exit_code == 0 and ck.save and last_saved != st.iteration:
        faults.save(checkpointer, st.iteration, ddp, optimizer, scheduler, st.consumed)
    faults.phase("save")
    checkpointer.close()
    faults.close()
    writer.close()
    log0(f"done: iteration {st.iteration}, consumed samples {st.consumed}, exit code {exit_code}")
    return exit_code


def train(plan: RunPlan | TrainConfig) -> int:
    """:func:`build` then :func:`run`: the whole training of a plan (or a config); returns the exit code."""
    try:
        return run(build(plan))
    finally:
        close_all()  # the watchdog of a build or run that raised


@cli_main()
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="apriel train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (examples/<model>/<stage>.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.optim.lr=1e-5")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the config and build every rank position of its layout on the meta device, no GPU")
    ap.add_argument("--nodes", type=int, help="with --dry-run: nodes of the allocation (default: the fewest that fit)")
    ap.add_argument("--gpus-per-node", type=int, help="with --dry-run: GPUs per node (default 8)")
    ap.add_argument("--no-files", action="store_true", help="with --dry-run: do not check data and checkpoint paths")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0,
                    help="with --dry-run: warn above this per GPU (H100: 80)")
    ap.add_argument("--check", action="store_true",
                    help="make the run plan at --nodes x --gpus-per-node (every check of the real run, data and "
                         "checkpoint paths read; nothing built) and exit: the SLURM launchers' pre-flight")
    args = ap.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.check:
        device = "cuda" if cfg.model.device == "auto" else cfg.model.device  # the allocation's, not this shell's
        plan = make_plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, device=device)
        lay = plan.layout
        print(f"plan: {plan.preset.name} ({plan.family.name}) at TP {lay.tp} x PP {lay.pp} x VPP {lay.vpp} "
              f"x CP {lay.cp} x DP {lay.dp} = {lay.world} processes, {plan.microbatches} micro-batches per step"
              + (f", resuming {cfg.checkpoint.save}" if plan.resumes else f", from {plan.load}" if plan.load else ""))
        return EXIT_OK
    if args.dry_run:
        dry_run(cfg, args.nodes, args.gpus_per_node, files=not args.no_files, gpu_memory_gib=args.gpu_memory_gib)
        return EXIT_OK
    # every config error ends here, before any process joins the rendezvous
    plan = make_plan(cfg, world=launch_world_size())
    code = train(plan)
    destroy_distributed()
    return code
