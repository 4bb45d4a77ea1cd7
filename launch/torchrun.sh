#!/usr/bin/env bash
# Starts one stage under torchrun, alone or as one node of many (run the same line on every node):
#   launch/torchrun.sh STAGE [CONFIG] [key=value ...]      STAGE: `python -m pipeline.core.stages names --launch`
#   launch/torchrun.sh STAGE@NAME CONFIG [key=value ...]   the run file's named instance `<section>@NAME:`
#   launch/torchrun.sh export CHECKPOINT OUT_DIR            (one process, no torchrun)
#   launch/torchrun.sh envcheck [--bytes N]                 (preflight: ranks, hosts, all-reduce GB/s)
# Env:
#   NPROC          processes on this node (default: its GPU count, else 1)
#   NNODES         nodes: N, or MIN:MAX to let membership change (elastic); >1 needs MASTER_ADDR
#   MASTER_ADDR, MASTER_PORT  c10d rendezvous host:port (any node all others reach; default port 29500)
#   RDZV_ID        id shared by the nodes of one job (default mlcd-STAGE; SLURM passes the job id)
#   MAX_RESTARTS   times the group restarts after a worker or node dies (default 0); every stage
#                  resumes from its last finished part/checkpoint, so a restart loses at most one
#                  checkpoint interval of work
#   LOG_DIR        per-rank stdout/stderr files under LOG_DIR (torchrun --log-dir, tee'd to console)
#   DRY_RUN=1      print the environment, the command and the rank layout; run nothing
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/env.sh
source "$here/env.sh"

stage=${1:?usage: torchrun.sh STAGE [CONFIG] [key=value ...]}; shift
instance=""
if [[ "$stage" == *@* ]]; then instance=${stage#*@}; stage=${stage%%@*}; fi
module=$(launch_module "$stage")
py=$(launch_python)
args=()
if [ "$stage" = export ] || [ "$stage" = envcheck ]; then
  args=("$@")
elif [ $# -gt 0 ] && [[ "$1" != *=* ]]; then
  args=(--config "$1"); shift; args+=("$@")
else
  args=("$@")
fi
if [ -n "$instance" ]; then args=(--instance "$instance" "${args[@]}"); fi

nproc=${NPROC:-$(launch_gpu_count)}; [ "$nproc" -gt 0 ] || nproc=1
nnodes=${NNODES:-1}
min_nodes=${nnodes%%:*}; max_nodes=${nnodes##*:}
launch_env_defaults "$nproc"

if [ "$stage" = export ]; then
  cmd=("$py" -m "$module" "${args[@]}")
  layout="# layout: 1 process (export reads a checkpoint on any number of ranks)"
else
  if [ "$max_nodes" -gt 1 ]; then
    port=${MASTER_PORT:-29500}
    endpoint="${MASTER_ADDR:?NNODES=$nnodes needs MASTER_ADDR (the rendezvous host)}:$port"
    rdzv=(--rdzv_backend=c10d "--rdzv_endpoint=$endpoint" "--rdzv_id=${RDZV_ID:-mlcd-$stage}")
    where="c10d rendezvous at $endpoint, id ${RDZV_ID:-mlcd-$stage}"
  else
    # --standalone: a private c10d store on a free port, so concurrent jobs on a box don't clash.
    rdzv=(--standalone)
    where="standalone (single node)"
  fi
  logs=()
  if [ -n "${LOG_DIR:-}" ]; then logs=("--log_dir=$LOG_DIR" --tee=3); fi
  cmd=("$py" -m torch.distributed.run "--nproc_per_node=$nproc" "--nnodes=$nnodes"
       "--max_restarts=${MAX_RESTARTS:-0}" "${rdzv[@]}" "${logs[@]}" -m "$module" "${args[@]}")
  if [ "$min_nodes" = "$max_nodes" ]; then
    world="world size $((nproc * max_nodes))"
  else
    world="world size $((nproc * min_nodes))..$((nproc * max_nodes)) (elastic)"
  fi
  layout="# layout: $nnodes node(s) x $nproc process(es) = $world; $where
# node k (assigned at rendezvous) holds RANK $nproc*k .. $nproc*k+$((nproc - 1)), LOCAL_RANK 0..$((nproc - 1)); run this same line on every node"
fi

if [ "${DRY_RUN:-0}" = 1 ]; then
  launch_env_print
  printf '%q ' "${cmd[@]}"; echo
  echo "$layout"
  exit 0
fi
exec "${cmd[@]}"
