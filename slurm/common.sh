# Sourced by slurm/*.sh after their #SBATCH lines: process layout, rendezvous, containers, signal
# forwarding and requeue, shared by every stage.
#
# One srun task per GPU (Megatron-LM's layout): each task reads SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID (megatron_apriel.runtime.init_distributed). Every task sees all GPUs of its node
# and picks SLURM_LOCALID, so do not bind GPUs per task (--gpus-per-task).
#
# Knobs, all optional, from the environment (sbatch exports it):
#   APRIEL_HOME      the repository checkout (default: the folder above the submitted script,
#                    found by the batch script from the job's Command: sbatch runs a spooled copy)
#   CONFIG           training config (a first script argument without '=' takes precedence)
#   OVERRIDES        space-separated key=value overrides; the script's key=value arguments follow
#   DEVICE=cpu       train on CPUs with gloo (adds model.device=cpu), e.g. the tiny configs
#   PYTHON           interpreter inside the allocation or the container (default: python)
#   CONTAINER_IMAGE  run the tasks in this pyxis/enroot image (srun --container-image)
#   CONTAINER_MOUNTS pyxis mounts (default: APRIEL_HOME and the submit folder at the same paths)
#   SRUN_ARGS        extra srun flags
#   MAX_REQUEUES     give up requeueing after this many restarts (default 50), stops and faults alike
#   EXCLUDE_BAD_NODES=1  on a hang or crash, requeue without the node(s) named as the culprit
#   APRIEL_FAULT_REPORT  where the tasks describe a fault for the account below (default
#                    ./.apriel-fault-<job id>.json in the submit folder)
#   TASK_EXIT_WAIT   seconds srun lets the other tasks run on after the first one exits (default 600)
#
# Signals: the scripts ask for `--signal=B:USR1@N`: SLURM signals this batch shell N seconds
# before the time limit (up to 30 s earlier: its time-limit check runs every 30 s), the shell asks
# every task to stop (see apriel_stop_tasks), the training loop checkpoints at the next step and
# exits with code 3, and the shell requeues the job (`scontrol requeue`); the next run resumes from
# checkpoint.save. Keep the B: (without it SLURM sends USR1 to every process of the tasks).
#
# Faults: a hang (exit 4: a rank's watchdog found a phase over its fault.*_timeout and named the
# ranks and nodes behind) or a crash (a task killed by a signal) is requeued like a stop, up to
# MAX_REQUEUES; any other failure (exit 1: NaN, disk full, a bug; 2: bad config) fails the job, as
# a rerun would fail the same way. Each fault gets one line: what, where, at which step, detected
# after how long; the requeued run logs how long the restart took and how many steps it recomputes.

set -euo pipefail

EXIT_REQUEUE=3
EXIT_HANG=4

apriel_log() { echo "[apriel $(date '+%F %T')] $*"; }

# A stop request that lands before the tasks run (during the set-up and the pre-flight, which imports
# the training stack: seconds; or at once, when --signal=B:USR1@N asks for more than the time limit)
# would kill this shell, USR1's default action, and the job with it. It is kept instead, and the
# tasks are asked to stop as soon as they run (APRIEL_STOP_AT_START, see apriel_srun).
APRIEL_STOP_PENDING=""
trap 'APRIEL_STOP_PENDING=1; apriel_log "received USR1 before the tasks started: they will be asked to stop once they run"' USR1

# MASTER_ADDR / MASTER_PORT from the allocation: the first node, and a port derived from the job id
# so that every task agrees without talking and a requeued job keeps its address.
apriel_rendezvous() {
  if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n1)
    MASTER_ADDR=${MASTER_ADDR:-localhost}
  fi
  MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
  export MASTER_ADDR MASTER_PORT
}

apriel_setup() {
  export APRIEL_HOME
  export PYTHONPATH="$APRIEL_HOME${PYTHONPATH:+:$PYTHONPATH}"
  PYTHON=${PYTHON:-python}
  apriel_rendezvous
  if [ "${DEVICE:-}" = cpu ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  fi
  apriel_log "job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}:" \
    "${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-localhost}, ${SLURM_NTASKS:-1} task(s)," \
    "master ${MASTER_ADDR}:${MASTER_PORT}, checkout ${APRIEL_HOME}"
  export APRIEL_FAULT_REPORT=${APRIEL_FAULT_REPORT:-$PWD/.apriel-fault-${SLURM_JOB_ID:-local}.json}
  if [ -f "$APRIEL_FAULT_REPORT" ]; then
    # the previous run ended on a fault: the training process reads it back to count recomputed steps
    mv -f "$APRIEL_FAULT_REPORT" "$APRIEL_FAULT_REPORT.prev"
    export APRIEL_FAULT_PREV="$APRIEL_FAULT_REPORT.prev"
    local t; t=$(apriel_report_field time "$APRIEL_FAULT_PREV")
    apriel_log "restart ${SLURM_RESTART_COUNT:-0} after $(apriel_report_field kind "$APRIEL_FAULT_PREV"):" \
      "starting $(( $(date +%s) - ${t%.*} )) s after the fault was detected"
  fi
}

# One field of the fault report (flat JSON written by training/fault.py or the task wrapper).
apriel_report_field() {
  sed -n "s/.*\"$1\": *\[\{0,1\}\"\{0,1\}\([^\",]*\).*/\1/p" "$2" 2>/dev/null | head -n1
}

# A path as given if it exists from the submit folder, else relative to the checkout, so that
# `sbatch slurm/cpt.sh examples/tiny/cpt.yaml` works from any folder.
apriel_resolve() {
  if [ -e "$1" ] || [ "${1#/}" != "$1" ]; then echo "$1"
  elif [ -e "$APRIEL_HOME/$1" ]; then echo "$APRIEL_HOME/$1"
  else echo "$1"; fi
}

# How a stop request reaches the training processes, and only them. SLURM delivers a signal to a job
# step by signalling every process of the step, helpers included (the process megatron-core's
# checkpoint writer spawns dies of USR1, and with it the final save). So the batch shell turns its
# USR1 (`--signal=B:USR1@N`) into SIGURG for the steps, which every process ignores by default, and
# a small wrapper around each task turns SIGURG into one USR1 for its own Python process alone. The
# wrapper starts Python with USR1 ignored (a stop request during imports must not kill it) and sends
# the USR1 once Python catches it (SigCgt in /proc), so a request that lands before the loop's
# handler is installed waits instead of being lost; exactly once, because an interpreter that is
# shutting down has USR1 back at its default action (terminate). Each task logs the hand-over with
# its host, so the job log shows that the request reached every node.
#
# A task that fails ends the whole step at once, as `srun --kill-on-bad-exit` would: the other ranks
# would otherwise wait in a collective until the distributed timeout. Not that flag itself: it also
# counts exit code 3 (checkpointed, requeue me) as bad, and across nodes the first rank to exit 3 had
# srun kill the others while they were still exiting, so the job failed instead of being requeued.
# The wrapper logs its host, task and exit, then cancels the step; where the task cannot run scancel
# (a container without the SLURM client) srun's --wait ends the step TASK_EXIT_WAIT seconds (default
# 600) after the first task exits.
APRIEL_TASK_WRAPPER='
trap "" USR1
"$@" &
pid=$!
catches_usr1() {
  local m; m=$(sed -n "s/^SigCgt:[[:space:]]*//p" "/proc/$pid/status" 2>/dev/null)
  [ -n "$m" ] && (( (16#$m >> 9) & 1 ))
}
notifier=""
on_urg() {
  [ -z "$notifier" ] || return 0
  (until catches_usr1; do kill -0 "$pid" 2>/dev/null || exit 0; sleep 1; done; kill -USR1 "$pid"
   echo "[apriel $(date "+%F %T")] ${SLURMD_NODENAME:-$HOSTNAME} task ${SLURM_PROCID:-0}: stop request passed to the training process (pid $pid)") &
  notifier=$!
}
trap on_urg URG
[ -z "${APRIEL_STOP_AT_START:-}" ] || on_urg  # the batch shell had a stop request before this step
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
rc=0; wait "$pid" || rc=$?
[ -z "$notifier" ] || kill "$notifier" 2>/dev/null
if [ "$rc" != 0 ] && [ "$rc" != 3 ]; then  # 3: EXIT_REQUEUE
  how="exited with code $rc"; [ "$rc" -le 128 ] || how="was killed by SIG$(kill -l $((rc - 128)))"
  # the first task to fail describes the fault, unless the training process did (a hang: exit 4)
  kind=error; [ "$rc" != 4 ] || kind=hang; [ "$rc" -le 128 ] || kind=crash
  [ -z "${APRIEL_FAULT_REPORT:-}" ] || (set -C; echo "{\"kind\": \"$kind\", \"rc\": $rc, \"time\": $(date +%s), \"culprit_hosts\": [\"${SLURMD_NODENAME:-$HOSTNAME}\"]}" > "$APRIEL_FAULT_REPORT") 2>/dev/null || true
  echo "[apriel $(date "+%F %T")] ${SLURMD_NODENAME:-$HOSTNAME} task ${SLURM_PROCID:-0}: ${1##*/} (pid $pid) $how:" \
    "ending step ${SLURM_JOB_ID:-}.${SLURM_STEP_ID:-}" >&2
  [ -z "${SLURM_STEP_ID:-}" ] || scancel --signal=KILL "$SLURM_JOB_ID.$SLURM_STEP_ID" 2>/dev/null || true
fi
exit "$rc"'

apriel_stop_tasks() {
  apriel_log "received USR1: asking the tasks to checkpoint at the next step (then requeue)"
  scancel --signal=URG "$SLURM_JOB_ID" 2>/dev/null || kill -URG "$APRIEL_SRUN_PID" 2>/dev/null || true
}

# srun one task per allocated task slot, in the background so this shell can take signals;
# returns the step's exit code (the highest of its tasks').
apriel_srun() {
  local -a args=(--kill-on-bad-exit=0 --wait="${TASK_EXIT_WAIT:-600}")
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    args+=(--container-image="$CONTAINER_IMAGE"
           --container-mounts="${CONTAINER_MOUNTS:-$APRIEL_HOME:$APRIEL_HOME,$PWD:$PWD}"
           --container-workdir="$PWD")
  fi
  # shellcheck disable=SC2206  # SRUN_ARGS is a list of flags on purpose
  if [ -n "${SRUN_ARGS:-}" ]; then args+=(${SRUN_ARGS}); fi
  local pending=$APRIEL_STOP_PENDING
  APRIEL_STOP_PENDING=""
  if [ -n "$pending" ]; then
    export APRIEL_STOP_AT_START=1  # each task's wrapper passes it on once its Python process can take it
    apriel_log "passing the stop request received before the start to the tasks"
  fi
  apriel_log "srun ${args[*]} $*"
  srun "${args[@]}" bash -c "$APRIEL_TASK_WRAPPER" apriel-task "$@" &
  APRIEL_SRUN_PID=$!
  trap apriel_stop_tasks USR1
  # a script's own apriel_stop_tasks (grpo.sh: a stop file) acts too; the wrappers take one request
  if [ -n "$pending" ]; then apriel_stop_tasks; fi
  # TERM (scancel, the time limit itself) reaches every task from SLURM: just keep waiting.
  trap 'apriel_log "received TERM: waiting for the tasks to exit"' TERM
  # A trapped signal interrupts `wait` (status > 128) while srun runs on: wait again until it ends;
  # the last `wait` returns srun's own status even when it had already been reaped.
  while kill -0 "$APRIEL_SRUN_PID" 2>/dev/null; do wait "$APRIEL_SRUN_PID" || true; done
  local rc=0
  wait "$APRIEL_SRUN_PID" || rc=$?
  unset APRIEL_STOP_AT_START
  # back to keeping a request for the next step (a script may run several)
  trap 'APRIEL_STOP_PENDING=1; apriel_log "received USR1 between steps: the next one will be asked to stop"' USR1
  trap - TERM
  return "$rc"
}

# The run plan of the config at this allocation (megatron_apriel.training.plan: every check the real
# run makes before it starts, data and checkpoint paths read), once, on the batch node, before any
# task starts: a bad config fails the job with one `error: <key>: ...` line instead of one per task.
# Skipped with CONTAINER_IMAGE (the batch shell is outside the image) or APRIEL_PREFLIGHT=0.
# Usage: apriel_preflight CONFIG [key=value ...]
apriel_preflight() {
  if [ -n "${CONTAINER_IMAGE:-}" ] || [ "${APRIEL_PREFLIGHT:-1}" = 0 ]; then return 0; fi
  local nodes=${SLURM_JOB_NUM_NODES:-1} tasks=${SLURM_NTASKS:-1}
  local config=$1; shift
  "$PYTHON" -m megatron_apriel.train --config "$config" "$@" --check \
    --nodes "$nodes" --gpus-per-node "$((tasks / nodes))" || {
    local rc=$?; apriel_log "pre-flight: the run plan refused the config (exit $rc)"; return "$rc"; }
}

# Run the training loop on every task and act on its exit code (apriel_requeue_on_exit).
# Usage: apriel_train DEFAULT_CONFIG [CONFIG] [key=value ...]
apriel_train() {
  local default_config=$1; shift
  local config=${CONFIG:-$default_config}
  if [ $# -gt 0 ] && [ "${1#*=}" = "$1" ]; then config=$1; shift; fi
  apriel_setup
  config=$(apriel_resolve "$config")
  # shellcheck disable=SC2206  # OVERRIDES is a list of key=value words on purpose
  local -a overrides=(${OVERRIDES:-} "$@")
  if [ "${DEVICE:-}" = cpu ]; then overrides+=(model.device=cpu); fi
  local rc=0
  apriel_preflight "$config" "${overrides[@]}" || return $?
  apriel_srun "$PYTHON" -m megatron_apriel.train --config "$config" "${overrides[@]}" || rc=$?
  apriel_requeue_on_exit "$rc" training
}

# Act on a stage's exit code: 0 done; 3 checkpointed (signal or train.exit_interval) -> requeue the
# job (the next run resumes); anything else fails the job. Returns the job's exit code.
# Usage: apriel_requeue_on_exit RC WHAT
apriel_requeue_on_exit() {
  local rc=$1 what=$2
  case "$rc" in
    0) apriel_log "$what finished (exit 0)" ;;
    "$EXIT_REQUEUE")
      local restarts=${SLURM_RESTART_COUNT:-0}
      if [ -z "${SLURM_JOB_ID:-}" ]; then
        apriel_log "checkpointed (exit 3); not under SLURM: run again to resume"
      elif [ "$restarts" -ge "${MAX_REQUEUES:-50}" ]; then
        apriel_log "checkpointed (exit 3) but restart $restarts >= MAX_REQUEUES=${MAX_REQUEUES:-50}: not requeueing"
      else
        apriel_log "checkpointed (exit 3): requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
        if scontrol requeue "$SLURM_JOB_ID"; then rc=0; else apriel_log "scontrol requeue failed"; fi
      fi ;;
    *)
      local kind="" report=${APRIEL_FAULT_REPORT:-}
      [ -z "$report" ] || kind=$(apriel_report_field kind "$report")
      if [ -z "$kind" ] && [ "$rc" -gt 128 ]; then kind=crash; fi
      if [ "$kind" = hang ] || [ "$kind" = crash ]; then
        apriel_requeue_fault "$rc" "$kind" "$report"
        rc=$?
      else
        # the failing task's own code (srun reports the highest, often a peer ended by the wrapper)
        local first_rc=""
        [ -z "$report" ] || first_rc=$(apriel_report_field rc "$report")
        rc=${first_rc:-$rc}
        apriel_log "$what failed (exit $rc)"
      fi ;;
  esac
  return "$rc"
}

# A hang or a crash: one line of account, then requeue (up to MAX_REQUEUES), optionally without the
# culprit node(s) (EXCLUDE_BAD_NODES=1). Returns 0 when requeued, else the exit code.
apriel_requeue_fault() {
  local rc=$1 kind=$2 report=$3 restarts=${SLURM_RESTART_COUNT:-0}
  local hosts step detected
  hosts=$(sed -n 's/.*"culprit_hosts": *\[\([^]]*\)\].*/\1/p' "$report" 2>/dev/null | tr -d '" ')
  step=$(apriel_report_field step "$report")
  detected=$(apriel_report_field detected_after_s "$report")
  apriel_log "fault: $kind (exit $rc) on ${hosts:-an unknown node}${step:+ at step $step}${detected:+, detected after $detected s}"
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    apriel_log "not under SLURM: run again to resume from the last checkpoint"; return "$rc"
  fi
  if [ "$restarts" -ge "${MAX_REQUEUES:-50}" ]; then
    apriel_log "restart $restarts >= MAX_REQUEUES=${MAX_REQUEUES:-50}: not requeueing"; return "$rc"
  fi
  if [ "${EXCLUDE_BAD_NODES:-0}" = 1 ] && [ -n "$hosts" ]; then
    local excluded
    excluded=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/.*ExcNodeList=\([^ ]*\).*/\1/p')
    [ "$excluded" = "(null)" ] && excluded=""
    if scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="${excluded:+$excluded,}$hosts"; then
      apriel_log "excluding node(s) $hosts from the requeued job"
    fi
  fi
  apriel_log "requeueing job $SLURM_JOB_ID after the $kind (restart $((restarts + 1)))"
  if scontrol requeue "$SLURM_JOB_ID"; then return 0; fi
  apriel_log "scontrol requeue failed"; return "$rc"
}
