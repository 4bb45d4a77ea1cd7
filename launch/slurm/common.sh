# shellcheck shell=bash
# Body of launch/slurm/stage.sbatch (sourced; the #SBATCH header lives there).
#   slurm_run_stage STAGE [CONFIG] [key=value ...]
# One srun task per node runs launch/torchrun.sh, i.e. one torchrun agent per node starting
# NPROC ranks; the agents meet at a c10d rendezvous on the job's first node (id = job id).
# Env (all optional): GPUS_PER_NODE / NPROC (ranks per node; default SLURM_GPUS_ON_NODE, else the
# node's GPU count), MASTER_PORT (default 29500 + job id % 1000, so jobs sharing a node don't
# collide), MAX_RESTARTS (in-job group restarts), MAX_REQUEUES (default 10), LOG_DIR
# (default logs/mlcd-<stage>-<job id>), DRY_RUN=1 (print what would run: srun line, environment and
# each node's torchrun line).
#
# Preemption and time limits: the templates ask for `--requeue --signal=B:USR1@300`. Five minutes
# before the limit SLURM sends USR1 to this shell; we requeue the job (scontrol requeue) and pass
# SIGTERM down srun -> torchrun -> ranks. On preemption SLURM itself sends SIGTERM and requeues
# (PreemptMode=REQUEUE). Either way the next start finds the same out_dir and every stage resumes
# from its last finished part/checkpoint, so at most one checkpoint interval is redone.

slurm_first_host() {
  if command -v "${SCONTROL:-scontrol}" >/dev/null 2>&1; then
    "${SCONTROL:-scontrol}" show hostnames "$1" | head -n 1
  else
    "$(launch_python)" -m launch.hostlist --first "$1"
  fi
}

_slurm_requeue() {  # USR1: the time limit is near
  local job=$SLURM_JOB_ID done=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-10}
  echo "[slurm] time limit near (USR1): stopping the step, requeueing job $job"
  if [ "$done" -lt "$max" ]; then "${SCONTROL:-scontrol}" requeue "$job"
  else echo "[slurm] not requeueing: $done requeues done (MAX_REQUEUES=$max)"; fi
  kill -TERM "$_SLURM_STEP_PID" 2>/dev/null || true
}

_slurm_term() {  # TERM: preempted (SLURM requeues by itself) or scancel'ed
  echo "[slurm] SIGTERM (preempted or cancelled): stopping the step"
  kill -TERM "$_SLURM_STEP_PID" 2>/dev/null || true
}

slurm_run_stage() {
  local stage=$1; shift
  local root; root=$(launch_root)
  local job=${SLURM_JOB_ID:?not inside a SLURM job (SLURM_JOB_ID unset); submit with sbatch}
  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?SLURM_NNODES unset}}
  local nodelist=${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST unset}
  local gpus=${GPUS_PER_NODE:-${NPROC:-${SLURM_GPUS_ON_NODE:-$(launch_gpu_count)}}}
  [ "$gpus" -gt 0 ] 2>/dev/null || gpus=1
  local head; head=$(slurm_first_host "$nodelist")
  export NNODES=$nodes NPROC=$gpus MASTER_ADDR=$head RDZV_ID=$job
  export MASTER_PORT=${MASTER_PORT:-$((29500 + job % 1000))}
  export MAX_RESTARTS=${MAX_RESTARTS:-2}
  export LOG_DIR=${LOG_DIR:-$root/logs/mlcd-$stage-$job}
  # --kill-on-bad-exit: a node whose agent gave up (restarts spent) takes the step down at once
  # instead of leaving the other nodes blocked in a collective until the NCCL timeout.
  local cmd=("${SRUN:-srun}" "--nodes=$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
  # srun >= 22.05 no longer inherits --cpus-per-task from sbatch: pass it, or each agent (and
  # its 8 ranks' DataLoader workers) would be pinned to a single core.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then cmd+=("--cpus-per-task=$SLURM_CPUS_PER_TASK"); fi
  cmd+=(bash "$root/launch/torchrun.sh" "$stage" "$@")
  echo "[slurm] job $job ${SLURM_JOB_NAME:-}: $nodes node(s) x $gpus GPU(s), rendezvous $head:$MASTER_PORT," \
       "requeue ${SLURM_RESTART_COUNT:-0} of ${MAX_REQUEUES:-10}, logs $LOG_DIR"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    echo "# each of the $nodes node(s) runs:"
    DRY_RUN=1 bash "$root/launch/torchrun.sh" "$stage" "$@"
    return 0
  fi
  mkdir -p "$LOG_DIR"
  local status=0
  trap _slurm_requeue USR1
  trap _slurm_term TERM
  # srun in the background + wait: bash runs a trap only between commands, and `wait` returns
  # as soon as a trapped signal arrives (a foreground srun would delay the trap until it ends).
  "${cmd[@]}" &
  _SLURM_STEP_PID=$!
  while kill -0 "$_SLURM_STEP_PID" 2>/dev/null; do  # a trap interrupts wait: wait again
    wait "$_SLURM_STEP_PID" && status=0 || status=$?
  done
  wait "$_SLURM_STEP_PID" && status=0 || status=$?  # the step's own exit status
  echo "[slurm] step exited with status $status"
  return "$status"
}
