"""Training throughput and MFU of the megatron-core training step at Mistral-Nemo width.

Runs N steps of a decoder with the Nemo shapes (hidden 5120, 32/8 heads, head_dim 128, FFN 14336,
vocab 131072) and as many layers as fit one GPU, for each available path: the local spec with
torch SDPA attention in bf16; the same with its linears in float8 through torchao
(``torchao-tensorwise``, ``torchao-rowwise``: ``model.fp8``, emulated on the CPU); Transformer Engine
bf16 and FP8 when TE is installed; with and without activation recomputation. Prints a table and
writes JSON.

    python benchmarks/train_throughput.py --layers 8 --seq 4096 --steps 10 --json perf.json
    python benchmarks/train_throughput.py --tiny --device cpu        # CPU smoke run
    python benchmarks/train_throughput.py --layers 8 --seq 4096 --results --profile   # on a GPU

Each configuration runs in its own process so peak memory and allocator state do not leak
between rows. ``--results`` writes the raw record of the run (every step time of every row, the
device, driver, torch / CUDA / cuDNN / megatron-core versions, the exact command and the commit) to
``benchmarks/results/``; ``benchmarks/perf_report.py`` makes the tables of docs/performance.md from
those files, so every published figure has its raw output in the repository. ``--profile`` runs a
few more steps under torch.profiler and prints where the step's time goes by op class
(``benchmarks/profile_summary.py``).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the model.fp8 value of each path that computes in float8 (others: none)
FP8_OF_PATH = {"te-fp8": "te-hybrid", "torchao-tensorwise": "torchao-tensorwise", "torchao-rowwise": "torchao-rowwise"}
RESULTS_DIR = HERE / "results"


def environment() -> dict:
    """What a figure depends on besides the code: the machine and the versions of the stack."""
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "hostname": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for dist in ("megatron-core", "transformer-engine", "transformers"):
        try:
            from importlib.metadata import version

            env[dist] = version(dist)
        except Exception:
            env[dist] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            env["driver"] = smi.stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                       timeout=30).stdout.strip() or None
        env["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                                           capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def run_one(args) -> dict:
    import torch

    from megatron_apriel.models import float8, get_preset, torch_fusions
    from megatron_apriel.models.builder import build_model_chunks, check_fp8, should_use_te
    from megatron_apriel.models.flops import flops_per_token, mfu, peak_flops
    from megatron_apriel.runtime import init_distributed
    from megatron_apriel.training.optimizer import OptimConfig, build_optimizer, wrap_ddp
    from megatron_apriel.training.step import train_step

    env = init_distributed(device=args.device, seed=0)
    device = env.device
    if args.tiny:
        preset = get_preset("tiny")
    else:
        preset = get_preset("mistral-nemo-12b", num_layers=args.layers)
    use_te = args.path.startswith("te")
    fp8 = check_fp8(FP8_OF_PATH.get(args.path), device)
    if use_te:
        should_use_te(device, True)
    bf16 = device == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    # the fusions in effect (none off CUDA; one this torch cannot do stays off)
    fusions = torch_fusions.install(torch_fusions.parse(args.fusion_set), device) if not use_te else ()
    config = preset.transformer_config(
        params_dtype=dtype, bf16=bf16, device=device, use_te=use_te, fp8=float8.te_format(fp8),
        recompute=args.recompute, torch_fusions=fusions,
    )
    chunks = build_model_chunks(preset, config, use_te=use_te, max_sequence_length=args.seq, fp8=fp8)
    if "layer" in fusions:
        torch_fusions.compile_layers(chunks)
    optim = OptimConfig(lr=1e-5, use_distributed_optimizer=True)
    ddp = wrap_ddp(chunks, config, optim)
    optimizer = build_optimizer(ddp, config, optim, fused_adam="adam" in fusions)

    mbs, s = args.micro_batch, args.seq
    dev = "cuda" if device == "cuda" else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    tokens = torch.randint(0, preset.vocab_size, (mbs, s + 1), device=dev, generator=g)
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(mbs, s, device=dev),
        "position_ids": torch.arange(s, device=dev).unsqueeze(0).expand(mbs, -1).contiguous(),
    }

    class Repeat:
        def __iter__(self):
            return self

        def __next__(self):
            return batch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        res = train_step(ddp, optimizer, Repeat(), args.grad_accum, s, mbs)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(res.loss)
    profile = None
    if args.profile_steps:
        from profile_summary import profile_steps

        trace = args.result + ".trace.json" if args.trace else None
        profile = profile_steps(lambda: train_step(ddp, optimizer, Repeat(), args.grad_accum, s, mbs),
                                args.profile_steps, device, trace)
    step_time = sorted(times)[len(times) // 2]
    tokens_per_step = mbs * s * args.grad_accum
    tps = tokens_per_step / step_time
    out = {
        "path": args.path,
        "recompute": args.recompute,
        "fusions": ",".join(fusions) or "none",
        "layers": preset.num_layers,
        "seq": s,
        "micro_batch": mbs,
        "grad_accum": args.grad_accum,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "params": preset.param_counts()["total"],
        "step_time_s": step_time,
        "step_times_s": times,
        "warmup": args.warmup,
        "tokens_per_s_per_gpu": tps,
        "flops_per_token": flops_per_token(preset, s),
        "tflops_per_gpu": tps * flops_per_token(preset, s) / 1e12,
        "mfu": mfu(tps, preset, s),
        "peak_flops": peak_flops(),
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "losses": losses,
    }
    if profile is not None:
        out["profile"] = profile
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers at Nemo width")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset (CPU smoke run)")
    ap.add_argument("--paths", default="sdpa-bf16,te-bf16,te-fp8",
                    help="comma list of sdpa-bf16, torchao-tensorwise, torchao-rowwise, te-bf16, te-fp8")
    ap.add_argument("--recomputes", default="none,selective,full")
    ap.add_argument("--fusions", default="default",
                    help="';'-separated variants of the torch-native fusions used without TE/apex, each "
                         "'none', 'default' or a comma list of wgrad,adam,gradnorm,rope,layer (a row per variant)")
    ap.add_argument("--json", default=None, help="write the raw record of the run to this file")
    ap.add_argument("--results", action="store_true",
                    help="write the raw record to benchmarks/results/train_throughput-<device>-<UTC time>.json")
    ap.add_argument("--profile", dest="profile_steps", nargs="?", const=3, type=int, default=0,
                    help="profile N more steps (default 3) per row and print the time by op class")
    ap.add_argument("--row-timeout", type=float, default=None,
                    help="seconds a row may take (start-up included); one that takes longer is recorded as failed")
    ap.add_argument("--trace", action="store_true", help="with --profile, keep each row's chrome trace")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="sdpa-bf16", help=argparse.SUPPRESS)
    ap.add_argument("--recompute", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--fusion-set", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:
        res = run_one(args)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return 0

    from megatron_apriel.models import torch_fusions
    from megatron_apriel.models.builder import te_available

    rows = []
    raw_argv = list(argv if argv is not None else sys.argv[1:])
    raw = list(raw_argv)
    base = []
    while raw:  # the per-row runs get every flag but where the record goes
        a = raw.pop(0)
        if a == "--json":
            raw.pop(0)
        elif a != "--results" and not a.startswith("--json="):
            base.append(a)
    variants = [v.strip() for v in args.fusions.split(";") if v.strip()]
    for name in variants:
        torch_fusions.parse(name)  # a typo fails here, not in every row
    for path, rc, fu in itertools.product(args.paths.split(","), args.recomputes.split(","), variants):
        if path.startswith("te") and not te_available():
            rows.append({"path": path, "recompute": rc, "fusions": fu, "error": "Transformer Engine is not installed"})
            continue
        result = f"/tmp/throughput-{os.getpid()}-{path}-{rc}-{len(rows)}.json"
        cmd = [sys.executable, os.path.abspath(__file__), *base, "--one", "--path", path,
               "--recompute", rc, "--fusion-set", fu, "--result", result]
        print(f"== {path} recompute={rc} fusions={fu}", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                      [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])})
        except subprocess.TimeoutExpired as e:
            rows.append({"path": path, "recompute": rc, "fusions": fu,
                         "error": f"took longer than --row-timeout {args.row_timeout:g} s",
                         "stderr_tail": (e.stderr or b"")[-4000:].decode(errors="replace")})
            continue
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error:" in ln]
            last = lines[-1:] or ["failed (exit %d)" % proc.returncode]
            rows.append({"path": path, "recompute": rc, "fusions": fu, "error": last[0][-160:],
                         "stderr_tail": proc.stderr[-4000:]})
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        with open(result) as f:
            rows.append(json.load(f))
        os.unlink(result)
        if args.trace and os.path.exists(result + ".trace.json"):
            rows[-1]["trace"] = result + ".trace.json"

    header = (f"{'path':<18} {'recompute':<10} {'fusions':<24} {'layers':>6} {'seq':>6} {'mbs x acc':>9} "
              f"{'step s':>8} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'loss 1st/last':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['path']:<18} {r['recompute']:<10} {r.get('fusions', '-'):<24} unavailable: {r['error']}")
            continue
        m = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_GiB']:.1f}" if r["peak_mem_GiB"] is not None else "-"
        acc = f"{r['micro_batch']} x {r['grad_accum']}"
        loss = f"{r['losses'][0]:.3f}/{r['losses'][-1]:.3f}"
        print(f"{r['path']:<18} {r['recompute']:<10} {r.get('fusions', '-'):<24} {r['layers']:>6} {r['seq']:>6} "
              f"{acc:>9} {r['step_time_s']:>8.3f} {r['tokens_per_s_per_gpu']:>10.0f} {r['tflops_per_gpu']:>8.1f} "
              f"{m:>6} {mem:>9} {loss:>14}")
    if rows and "device" in next((r for r in rows if "device" in r), {}):
        print(f"device: {next(r for r in rows if 'device' in r)['device']}")
    for r in rows:
        if "profile" in r:
            from profile_summary import format_breakdown

            print(f"\n{r['path']} recompute={r['recompute']} fusions={r.get('fusions', '-')} "
                  f"micro-batch {r['micro_batch']} x {r['grad_accum']}: time by op class "
                  f"({r['profile']['steps']} profiled steps)")
            print(format_breakdown(r["profile"]))
    record = {
        "benchmark": "train_throughput",
        "command": "python benchmarks/train_throughput.py " + shlex.join(raw_argv),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "environment": environment(),
        "rows": rows,
    }
    targets = [args.json] if args.json else []
    if args.results:
        device = (record["environment"].get("gpu") or "cpu").replace(" ", "-")
        RESULTS_DIR.mkdir(exist_ok=True)
        targets.append(str(RESULTS_DIR / f"train_throughput-{device}-{record['utc'].replace(':', '')}.json"))
    for target in targets:
        tmp = target + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, target)
        print(f"raw results: {target}")
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
