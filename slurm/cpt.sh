#!/bin/bash
# Continued pretraining (the 60/25/15 curriculum): sbatch slurm/cpt.sh [CONFIG] [key=value ...]
# Defaults below are for examples/apriel_nemotron_15b/cpt.yaml (TP=8 x PP=2, 4 nodes of 8 GPUs);
# override any of them on the sbatch command line (sbatch --nodes=8 --time=2-00:00:00 ...).
# Tiny run on CPUs: DEVICE=cpu sbatch --nodes=1 --gpus-per-node=0 --ntasks-per-node=1 slurm/cpt.sh examples/tiny/cpt.yaml
# `mkdir -p logs` first: SLURM does not create the folder of --output.
#SBATCH --job-name=apriel-cpt
#SBATCH --nodes=4
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
apriel_train examples/apriel_nemotron_15b/cpt.yaml "$@"
