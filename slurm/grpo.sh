#!/bin/bash
# GRPO (TRL's GRPOTrainer, FSDP through accelerate): sbatch slurm/grpo.sh [CONFIG] [key=value ...]
# e.g. sbatch slurm/grpo.sh examples/apriel_nemotron_15b/grpo.yaml model.path=ckpt/A-hf \
#        data.train_file=runs/apriel_nemotron_15b/grpo/filtered_prompts.jsonl
# One srun task per node runs `accelerate launch` with ACCELERATE_CONFIG (default
# examples/apriel_nemotron_15b/accelerate_fsdp.yaml), told the node count, this node's rank and the
# rendezvous from SLURM; each starts one trainer per GPU. vLLM is colocated by default.
# VLLM_SERVER=1: the last node of the allocation runs `trl vllm-serve` (VLLM_TP GPUs, default all of
# them) and the other nodes train against it (grpo.vllm_mode=server); ask for one more node.
# Time limit: SLURM's USR1 (--signal=B:USR1@N) makes this shell create APRIEL_STOP_FILE; the
# trainers checkpoint at the end of the step (out_dir/checkpoint-N), exit 3, and the job is requeued;
# the next run resumes from the newest checkpoint. `mkdir -p logs` first.
# Tiny run on CPU: DEVICE=cpu sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 slurm/grpo.sh \
#   examples/tiny/grpo.yaml model.path=DIR data.train_file=prompts.jsonl
#SBATCH --job-name=apriel-grpo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@900
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

# The trainers run under accelerate's launcher, where a signal to the srun task does not reach them:
# a stop request is a file on the shared filesystem that every rank checks after each step.
export APRIEL_STOP_FILE=${APRIEL_STOP_FILE:-$PWD/logs/.apriel-grpo-stop-${SLURM_JOB_ID:-$$}}
apriel_stop_tasks() {
  apriel_log "received USR1: asking the trainers to checkpoint at the end of the step (then requeue)"
  touch "$APRIEL_STOP_FILE"
}

config=${CONFIG:-examples/apriel_nemotron_15b/grpo.yaml}
if [ $# -gt 0 ] && [ "${1#*=}" = "$1" ]; then config=$1; shift; fi
apriel_setup
config=$(apriel_resolve "$config")
rm -f "$APRIEL_STOP_FILE"  # a requeued job keeps its id: the previous run's request is done
# shellcheck disable=SC2206  # OVERRIDES is a list of key=value words on purpose
overrides=(${OVERRIDES:-} "$@")

export PYTHON NNODES=${SLURM_JOB_NUM_NODES:-1}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export ACCELERATE_CONFIG
ACCELERATE_CONFIG=$(apriel_resolve "${ACCELERATE_CONFIG:-examples/apriel_nemotron_15b/accelerate_fsdp.yaml}")
server_pid=""
if [ "${VLLM_SERVER:-0}" = 1 ] && [ "${DEVICE:-}" != cpu ]; then
  server=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tail -n1)
  model=""
  for o in "${overrides[@]}"; do case "$o" in model.path=*) model=${o#model.path=} ;; esac; done
  [ -n "$model" ] || { apriel_log "VLLM_SERVER=1 needs model.path=... on the command line"; exit 2; }
  port=${VLLM_PORT:-8000}
  apriel_log "vLLM server on $server:$port (tensor parallel ${VLLM_TP:-$GPUS_PER_NODE})"
  srun --nodes=1 --ntasks=1 --nodelist="$server" "$PYTHON" -m trl.scripts.vllm_serve --model "$model" \
    --tensor_parallel_size "${VLLM_TP:-$GPUS_PER_NODE}" --port "$port" &
  server_pid=$!
  NNODES=$((NNODES - 1))
  SRUN_ARGS="${SRUN_ARGS:-} --nodes=$NNODES --ntasks=$NNODES --exclude=$server"
  overrides+=(grpo.use_vllm=true grpo.vllm_mode=server "grpo.vllm_server_host=$server" "grpo.vllm_server_port=$port")
fi

rc=0
if [ "${DEVICE:-}" = cpu ]; then
  apriel_srun "$PYTHON" -m megatron_apriel.rl.grpo --config "$config" "${overrides[@]}" || rc=$?
else
  # SLURM_NODEID is read by each task, hence the single quotes.
  # shellcheck disable=SC2016
  launch='exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NNODES" --num_processes "$((NNODES * GPUS_PER_NODE))" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" -m megatron_apriel.rl.grpo "$@"'
  apriel_srun bash -c "$launch" grpo --config "$config" "${overrides[@]}" || rc=$?
fi
[ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
apriel_requeue_on_exit "$rc" GRPO
