#!/bin/bash
# SFT (packed chat data, loss on assistant tokens): sbatch slurm/sft.sh [CONFIG] [key=value ...]
# e.g. sbatch slurm/sft.sh examples/apriel_nemotron_15b/sft_b.yaml, examples/apriel_1p5_15b/sft.yaml
# Defaults below are for examples/apriel_nemotron_15b/sft_a.yaml; override any on the sbatch command line
# (sbatch --nodes=N --time=... slurm/sft.sh CONFIG key=value ...). `mkdir -p logs` first.
# Tiny run on CPUs: DEVICE=cpu sbatch --nodes=1 --gpus-per-node=0 --ntasks-per-node=1 slurm/sft.sh examples/tiny/sft.yaml checkpoint.load=...
#SBATCH --job-name=apriel-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# sbatch runs a spooled copy of this file: find the checkout from the job's Command instead of $0.
if [ -z "${APRIEL_HOME:-}" ]; then
  _script=$0
  [ -n "${SLURM_JOB_ID:-}" ] && _script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
  APRIEL_HOME=$(cd "$(dirname "$_script")/.." && pwd)
fi
source "$APRIEL_HOME/slurm/common.sh"
apriel_train examples/apriel_nemotron_15b/sft_a.yaml "$@"
