# shellcheck shell=bash
# Environment shared by every launcher (sourced, never run). Each default is set only if the
# caller has not set it, so a site's own NCCL/IB settings always win.
#   launch_env_defaults NPROC   export the defaults (OMP threads are split across NPROC ranks)
#   launch_env_print            `export K=V` lines for the variables that shape a run (dry runs)

launch_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

launch_python() {
  local root; root=$(launch_root)
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -x "$root/.venv/bin/python" ]; then echo "$root/.venv/bin/python"
  else echo python3; fi
}

launch_gpu_count() {
  # `nvidia-smi -L` lists one line per visible GPU; no driver -> 0 (CPU/gloo path).
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else echo 0; fi
}

launch_env_defaults() {
  local nproc=${1:-1} root cores
  root=$(launch_root)
  # Stages import as `pipeline.*`, `training.*` from the repo, whatever the cwd of the worker.
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  if [ -z "${DS_ACCELERATOR:-}" ]; then
    if [ "$(launch_gpu_count)" -gt 0 ]; then DS_ACCELERATOR=cuda; else DS_ACCELERATOR=cpu; fi
  fi
  export DS_ACCELERATOR
  # One OpenMP pool per rank sized to its share of the cores; torchrun would force 1, which
  # starves the CPU-side work (JPEG decode runs in DataLoader workers, faiss-cpu in the rank).
  cores=$(nproc 2>/dev/null || echo 1)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
  # A hung or failed collective raises in every rank instead of blocking forever, so the
  # torchrun agent sees a dead worker and restarts the group (--max-restarts) from the checkpoint.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # torchrun shares its rendezvous TCPStore with the workers' process group by default; after a
  # restart the new workers then read the dead workers' addresses from it and gloo/NCCL fail to
  # connect (pytorch#135712, #167288; measured here: every --max-restarts restart failed with
  # "Gloo connectFullMesh ... Connection refused"). A private store per attempt fixes it.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Site-specific: leave unset unless the site sets them (e.g. NCCL_SOCKET_IFNAME=ib0,
  # NCCL_IB_HCA=mlx5). Wrong values silently fall back to TCP sockets at ~1/10 the bandwidth.
}

LAUNCH_ENV_VARS=(PYTHONPATH OMP_NUM_THREADS DS_ACCELERATOR HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
  TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_DISABLE_SHARE_RDZV_TCP_STORE NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE
  NCCL_NET_GDR_LEVEL CUDA_VISIBLE_DEVICES MASTER_ADDR MASTER_PORT WANDB_MODE)

launch_env_print() {
  local v
  for v in "${LAUNCH_ENV_VARS[@]}"; do
    if [ -n "${!v:-}" ]; then printf 'export %s=%q\n' "$v" "${!v}"; fi
  done
}

# stage name -> python module, looked up in the one stage table (pipeline/core/stages.py).
launch_module() {
  local root; root=$(launch_root)
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$(launch_python)" -m pipeline.core.stages module "$1"
}
