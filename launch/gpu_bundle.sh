#!/usr/bin/env bash
# `make gpu-bundle`: everything `make gpu-check` needs on an offline CUDA box that already has
# python3 (3.12, x86_64) with torch/torchvision/transformers/numpy/... but nothing else of ours:
#   .gpu_bundle/wheels/  the missing packages as wheels (installed there with --no-index --no-deps)
#   .gpu_bundle/run/data the demo shards + probe sets at small size, built by pipeline.demo.demo_data
# Run it here (with network and the Debian image packages from `make apt`). faiss is left out on
# purpose: faiss-cpu/faiss-gpu wheels are tens of MB each and faiss-gpu-cu12 needs CUDA 12
# libraries such a box lacks, so the check uses the torch k-means method there and records
# "faiss GPU: not installable" as SKIP.
set -euo pipefail
out=${1:-.gpu_bundle}
venv=${VENV:-.venv}
py=$venv/bin/python
# Versions: ours (requirements.txt / setup.sh) and the pins of their dependencies in .venv. Each
# line's Requires-Dist was checked against the box's package list (launch/gpu_check.py notes):
# open_clip needs ftfy (-> wcwidth) besides what is there; webdataset braceexpand; deepspeed
# hjson + pydantic (-> pydantic-core, annotated-types, typing-inspection, typing-extensions>=4.16).
pure=(open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0 hjson==3.1.0
      pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
      ftfy==6.3.1 wcwidth==0.9.4)
binary=(pydantic-core==2.50.5)
mkdir -p "$out/wheels"
rm -f "$out"/wheels/*.whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$py" -m pip download -q --no-deps "${plat[@]}" -d "$out/wheels" "${pure[@]}" "${binary[@]}"
# DeepSpeed from source as a py3-none-any wheel with no prebuilt ops (nothing to match the box's
# CUDA; the check uses torch's AdamW, so no op is ever JIT-built there either).
if [ ! -f "$out/wheels/deepspeed-0.19.8-py3-none-any.whl" ]; then
  DS_BUILD_OPS=0 "$venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$out/wheels" deepspeed==0.19.8
fi
# Small real shards (a few hundred images) with the project's own demo-data code.
if [ ! -f "$out/run/data/train/00000.tar" ]; then
  PYTHONPATH=$PWD "$py" -m pipeline.demo.demo_data --config configs/gpu_check.yaml run.out_dir="$out/run"
fi
ls -1 "$out/wheels"
du -sh "$out/wheels" "$out/run/data" "$out"
size=$(du -sm "$out" | cut -f1)
echo "gpu-bundle: $out is ${size} MiB (limit for the device copy: 64 MiB with the code)"
[ "$size" -lt 60 ] || { echo "gpu-bundle: too large (>= 60 MiB)" >&2; exit 1; }
