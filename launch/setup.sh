#!/usr/bin/env bash
# Creates the virtual environment with pinned dependencies. Idempotent (make keeps a stamp file).
# Order matters: torch first (DeepSpeed builds its ops against it), then DeepSpeed with the CPU
# shm_comm op prebuilt (otherwise its first initialize JIT-compiles it with g++, ~85 s per run).
set -euo pipefail
venv=${1:-.venv}
py=${2:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip wheel setuptools
"$pip" install -q torch==2.14.1 torchvision==0.29.1
"$pip" install -q -r requirements.txt ruff
if ! "$venv/bin/python" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_SHM_COMM=1 "$pip" install -q --no-cache-dir --no-build-isolation deepspeed==0.19.8
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  # CUDA box: faiss-gpu also imports as `faiss`.
  "$pip" install -q faiss-gpu-cu12 || echo "faiss-gpu not installed; faiss-cpu stays in use" >&2
fi
"$pip" install -q --no-deps -e .
echo "setup: $("$venv/bin/python" -c 'import torch, deepspeed, faiss, open_clip, transformers, webdataset; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "faiss", faiss.__version__, "open_clip", open_clip.__version__, "transformers", transformers.__version__)')"
