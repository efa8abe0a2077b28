#!/bin/bash
# HF <-> Megatron checkpoint conversion on a CPU node (tools/convert_checkpoint.py, same arguments):
#   sbatch slurm/convert.sh hf-to-mcore --hf Mistral-Nemo-Base-2407 --out ckpt/nemo --dtype bf16
#   sbatch --ntasks=4 slurm/convert.sh hf-to-mcore --hf DIR --out ckpt/x --tp 2 --pp 2   # one task per rank
#   sbatch slurm/convert.sh mcore-to-hf --ckpt runs/sft/checkpoints --out hf/apriel --chat-template apriel
# `mkdir -p logs` first. Not requeued: a conversion writes its output atomically, rerun it if it stops.
#SBATCH --job-name=apriel-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out

# sbatch runs a spooled copy of this file: find the checkout from the job's Command instead of $0.
if [ -z "${APRIEL_HOME:-}" ]; then
  _script=$0
  [ -n "${SLURM_JOB_ID:-}" ] && _script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
  APRIEL_HOME=$(cd "$(dirname "$_script")/.." && pwd)
fi
source "$APRIEL_HOME/slurm/common.sh"
apriel_setup
rc=0
apriel_srun "$PYTHON" "$APRIEL_HOME/tools/convert_checkpoint.py" "$@" || rc=$?
apriel_log "conversion finished (exit $rc)"
exit "$rc"
