#!/usr/bin/env bash
# Starts one stage under torchrun: launch/torchrun.sh STAGE [CONFIG] [key=value ...]
# Env: NPROC (processes per node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, MAX_RESTARTS,
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
stage=${1:?usage: torchrun.sh STAGE [CONFIG] [overrides...]}; shift
declare -A modules=([embed]=pipeline.embed [cluster]=clustering.kmeans [assign]=clustering.assign
                    [train]=training.train [eval]=training.eval [export]=training.export)
module=${modules[$stage]:?unknown stage $stage}
config_args=()
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config_args=(--config "$1"); shift; fi
py=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$py" ] || py=python3
nproc=${NPROC:-1}; nnodes=${NNODES:-1}
if [ "$nnodes" -gt 1 ]; then
  rdzv=(--rdzv_backend=c10d "--rdzv_endpoint=${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" "--rdzv_id=${RDZV_ID:-mlcd-$stage}")
else
  rdzv=(--standalone)
fi
cmd=("$py" -m torch.distributed.run "--nproc_per_node=$nproc" "--nnodes=$nnodes"
     "--max_restarts=${MAX_RESTARTS:-0}" "${rdzv[@]}" -m "$module" "${config_args[@]}" "$@")
if [ "$stage" = export ]; then cmd=("$py" -m "$module" "$@"); fi
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
