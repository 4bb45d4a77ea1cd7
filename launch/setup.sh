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
# faiss: exactly one build importable. faiss-cpu and faiss-gpu-cu12 both own site-packages/faiss/,
# so installing one over the other leaves a mix of both: CUDA boxes get only the GPU build
# (falling back to faiss-cpu if it cannot be installed), CPU boxes only faiss-cpu.
FAISS_CPU=faiss-cpu==1.15.1
FAISS_GPU=faiss-gpu-cu12==1.14.1.post1
grep -v '^faiss-cpu' requirements.txt > "$venv/requirements.nofaiss.txt"
"$pip" install -q -r "$venv/requirements.nofaiss.txt" -r requirements-dev.txt  # dev: pinned ruff, mypy
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # a faiss-cpu left from before shares files with faiss-gpu: remove both, reinstall the GPU one
  if "$pip" show -q faiss-cpu >/dev/null 2>&1; then "$pip" uninstall -y -q faiss-cpu faiss-gpu-cu12 || true; fi
  if ! "$pip" install -q "$FAISS_GPU"; then
    echo "setup: $FAISS_GPU not installable here; using $FAISS_CPU (k-means method=torch runs on the GPU)" >&2
    "$pip" install -q "$FAISS_CPU"
  fi
else
  if "$pip" show -q faiss-gpu-cu12 >/dev/null 2>&1; then "$pip" uninstall -y -q faiss-cpu faiss-gpu-cu12 || true; fi
  "$pip" install -q "$FAISS_CPU"
fi
if ! "$venv/bin/python" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_SHM_COMM=1 "$pip" install -q --no-cache-dir --no-build-isolation deepspeed==0.19.8
fi
"$pip" install -q --no-deps -e .
echo "setup: $("$venv/bin/python" -c 'import torch, deepspeed, faiss, open_clip, transformers, webdataset; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "faiss", faiss.__version__, "open_clip", open_clip.__version__, "transformers", transformers.__version__)')"
echo "setup: $("$venv/bin/python" -c 'import faiss, os; print("faiss", faiss.__version__, "from", os.path.dirname(faiss.__file__), "GPUs:", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)')"
