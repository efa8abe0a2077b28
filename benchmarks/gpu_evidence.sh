#!/usr/bin/env bash
# Everything this repository checks on one GPU, in one go (about 10-15 minutes on an H100/H200):
#   1. the throughput benchmark at the 8-layer Nemo-width slice, one row per torch-fusion variant,
#      each with its profile by op class (the "before" row is fusions=none);
#   2. the GPU test suite (tests/gpu);
#   3. the same slice at a longer gradient accumulation and at micro-batch 2 with selective recompute;
#   4. the float8 part below.
# With PART=float8 (second argument) only the float8 part runs (about 8 minutes on an H100):
#   a. the slice in bf16 (the baseline, same run) and with its linears in float8 through torchao
#      (tensorwise, rowwise), default fusions; then bf16 and tensorwise with each layer compiled
#      (fusion "layer");
#   b. the GPU tests of float8 (200 steps against bf16), save/resume bit for bit, the wgrad GEMM and
#      the fused-vs-unfused training.
# Raw records land in benchmarks/results/ (and are copied to OUTDIR with the logs); make the tables
# of docs/performance.md from them with `python benchmarks/perf_report.py --update docs/performance.md`.
#
#   bash benchmarks/gpu_evidence.sh [OUTDIR] [all|float8]
#
# On a machine without network, install the wheels benchmarks/offline_wheels.sh downloads first.
# Each part has its own time limit, so one that hangs cannot take the others' time.
set -u
OUTDIR=${1:-gpu_evidence_out}
PART=${2:-all}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
BENCH=(benchmarks/train_throughput.py --layers 8 --seq 4096 --paths sdpa-bf16 --results --row-timeout 80)
t0=$(date +%s)
STARTED=$(mktemp)  # the records this run writes are the ones newer than this file
new_records() { find benchmarks/results -maxdepth 1 -name 'train_throughput-*.json' -newer "$STARTED" -exec cp {} "$OUTDIR/" \; ; }
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -c "import torch, megatron.core, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)" || exit 1
$PY -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
$PY -c "
from megatron_apriel.models import torch_fusions
print('torch fusions in effect:', torch_fusions.install(torch_fusions.KNOWN, 'cuda'))"

float8_part() {
    stamp "throughput: bf16 and float8 (torchao), default fusions"
    timeout 200 $PY "${BENCH[@]}" --paths sdpa-bf16,torchao-tensorwise,torchao-rowwise --recomputes none \
        --grad-accum 4 --steps 5 --warmup 2 --fusions default 2>&1 | tee "$OUTDIR/bench_float8.log" | tail -8
    new_records

    stamp "GPU tests: float8 against bf16 over 200 steps, save/resume, the wgrad GEMM, fused vs unfused"
    timeout 260 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu_training.py -rA --durations=10 \
        -k "float8_tracks or save_and_resume or wgrad_accumulation or fusions_train_like" 2>&1 \
        | tee "$OUTDIR/tests_float8.log" | tail -25

    stamp "throughput: each layer compiled (fusion 'layer'), bf16 and float8"
    timeout 170 $PY benchmarks/train_throughput.py --layers 8 --seq 4096 --results --row-timeout 150 \
        --paths sdpa-bf16,torchao-tensorwise --recomputes none --grad-accum 4 --steps 5 --warmup 3 \
        --fusions default,layer 2>&1 | tee "$OUTDIR/bench_layer.log" | tail -6
    new_records
}

if [ "$PART" = float8 ]; then
    float8_part
    stamp "done"
    ls -la "$OUTDIR"
    exit 0
fi

stamp "throughput: fusion variants, profiled"
timeout 420 $PY "${BENCH[@]}" --recomputes none --grad-accum 4 --steps 5 --warmup 2 --profile 2 \
    --fusions "none;adam;wgrad;default;default,rope" 2>&1 | tee "$OUTDIR/bench_fusions.log"

stamp "GPU tests"
timeout 900 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu -x --durations=10 2>&1 \
    | tee "$OUTDIR/tests_gpu.log" | tail -40

stamp "throughput: accumulation and micro-batch"
timeout 90 $PY "${BENCH[@]}" --recomputes none --grad-accum 16 --steps 3 --warmup 1 --fusions default 2>&1 \
    | tee "$OUTDIR/bench_accum16.log" | tail -4
timeout 90 $PY "${BENCH[@]}" --recomputes selective --micro-batch 2 --grad-accum 2 --steps 4 --warmup 2 \
    --fusions default 2>&1 | tee "$OUTDIR/bench_mbs2.log" | tail -4

float8_part
new_records
stamp "done"
ls -la "$OUTDIR"
