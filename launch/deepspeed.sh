#!/usr/bin/env bash
# Starts a stage with DeepSpeed's own launcher over an MPI-style hostfile (`host slots=8` lines):
#   HOSTFILE=hosts launch/deepspeed.sh STAGE CONFIG [key=value ...]     (usually STAGE=train)
# From the first host, the launcher reaches every host with pdsh (passwordless ssh) and starts
# one deepspeed.launcher.launch per node; ranks follow the hostfile order (host 0 -> RANK 0..G-1).
# Env:
#   HOSTFILE       required; NUM_NODES (default: all hosts), NUM_GPUS (per node, default: slots)
#   MASTER_ADDR    default: the first host; MASTER_PORT default 29500
#   DS_LAUNCHER    pdsh (default) | openmpi | slurm | mpich | impi | mvapich
#   NO_SSH=1 NODE_RANK=k   no ssh: run this script on every node yourself with its NODE_RANK
#                          (containers, Kubernetes); needs MASTER_ADDR reachable from all
#   DS_ENV_FILE    env file the launcher exports on remote hosts (default: LOG_DIR/deepspeed_env);
#                  pdsh forwards only NCCL*/PYTHON*/UCX* by itself, so DS_ACCELERATOR, OMP and
#                  offline flags travel through this file
#   DRY_RUN=1      print the environment, the env file, the command and the rank layout
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/env.sh
source "$here/env.sh"

stage=${1:?usage: HOSTFILE=hosts deepspeed.sh STAGE CONFIG [key=value ...]}; shift
module=$(launch_module "$stage")
if [ "$stage" = envcheck ]; then args=("$@")  # preflight: takes its own flags, no config
else args=(--config "${1:?usage: HOSTFILE=hosts deepspeed.sh STAGE CONFIG [key=value ...]}"); shift; args+=("$@"); fi
hostfile=${HOSTFILE:?set HOSTFILE (lines: 'hostname slots=8')}
[ -f "$hostfile" ] || { echo "deepspeed.sh: HOSTFILE=$hostfile not found" >&2; exit 2; }

# Parse the hostfile the way DeepSpeed does (`name slots=N`, # comments) to fail early on a bad
# one and to print the exact rank layout.
hosts=(); slots=()
while read -r line || [ -n "$line" ]; do
  line=${line%%#*}
  [ -z "${line// /}" ] && continue
  if [[ "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]]; then
    hosts+=("${BASH_REMATCH[1]}"); slots+=("${BASH_REMATCH[2]}")
  else
    echo "deepspeed.sh: $hostfile: bad line '$line' (expected 'hostname slots=N')" >&2; exit 2
  fi
done < "$hostfile"
[ "${#hosts[@]}" -gt 0 ] || { echo "deepspeed.sh: $hostfile lists no hosts" >&2; exit 2; }
num_nodes=${NUM_NODES:-${#hosts[@]}}
if [ "$num_nodes" -gt "${#hosts[@]}" ]; then
  echo "deepspeed.sh: NUM_NODES=$num_nodes but $hostfile lists ${#hosts[@]} host(s)" >&2; exit 2
fi
master=${MASTER_ADDR:-${hosts[0]}}
port=${MASTER_PORT:-29500}

ds_args=("--hostfile=$hostfile" "--num_nodes=$num_nodes" "--master_addr=$master" "--master_port=$port"
         "--launcher=${DS_LAUNCHER:-pdsh}" --no_local_rank --module)
# Our stages take `--config F key=value`; --no_local_rank keeps DeepSpeed from appending
# --local_rank (they read LOCAL_RANK from the environment like under torchrun).
if [ -n "${NUM_GPUS:-}" ]; then ds_args+=("--num_gpus=$NUM_GPUS"); fi
if [ "${NO_SSH:-0}" = 1 ]; then
  ds_args+=(--no_ssh "--node_rank=${NODE_RANK:?NO_SSH=1 needs NODE_RANK}")
fi

launch_env_defaults "${NUM_GPUS:-${slots[0]}}"
env_file=${DS_ENV_FILE:-${LOG_DIR:-$PWD/logs}/deepspeed_env}
env_lines=$(for v in DS_ACCELERATOR OMP_NUM_THREADS HF_HUB_OFFLINE TRANSFORMERS_OFFLINE WANDB_MODE \
                     TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_DISABLE_SHARE_RDZV_TCP_STORE TOKENIZERS_PARALLELISM; do
              if [ -n "${!v:-}" ]; then echo "$v=${!v}"; fi; done)
py=$(launch_python)
cmd=("$(dirname "$py")/deepspeed" "${ds_args[@]}" "$module" "${args[@]}")
[ -x "${cmd[0]}" ] || cmd[0]=deepspeed

layout="# layout: $num_nodes node(s); master $master:$port; ranks in hostfile order"
rank=0
for ((i = 0; i < num_nodes; i++)); do
  g=${NUM_GPUS:-${slots[$i]}}
  layout+=$'\n'"# node $i ${hosts[$i]}: RANK $rank..$((rank + g - 1)), LOCAL_RANK 0..$((g - 1))"
  rank=$((rank + g))
done
layout+=$'\n'"# world size $rank"

if [ "${DRY_RUN:-0}" = 1 ]; then
  launch_env_print
  echo "export DS_ENV_FILE=$env_file"
  echo "# $env_file:"; echo "#   ${env_lines//$'\n'/$'\n'#   }"
  printf '%q ' "${cmd[@]}"; echo
  echo "$layout"
  exit 0
fi
mkdir -p "$(dirname "$env_file")"
printf "%s\n" "$env_lines" > "$env_file.$$" && mv -f "$env_file.$$" "$env_file"
export DS_ENV_FILE=$env_file
exec "${cmd[@]}"
