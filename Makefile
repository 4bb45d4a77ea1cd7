# OpenMLCD. `make demo` and `make test` do all set-up on a fresh machine (see README).
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.setup-done
CONFIG ?=
NPROC ?= 1
NNODES ?= 1
ARGS ?=
# No GPU -> DeepSpeed's CPU accelerator (gloo); on CUDA boxes leave it unset.
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# `make STAGE CONFIG=F ARGS="k=v ..."` for every stage the shell launchers start, read from the
# stage table (pipeline/core/stages.py; stdlib only, so the system python reads it before setup).
STAGE_TARGETS := $(shell cd $(CURDIR) && $(PY_SYS) -m pipeline.core.stages names --launch)
ifeq ($(STAGE_TARGETS),)
$(error could not read the stage targets: $(PY_SYS) -m pipeline.core.stages names --launch)
endif

.PHONY: setup apt demo demo-data rice-demo ablation test test-fast bench gpu-check gpu-bundle lint typecheck clean $(STAGE_TARGETS)

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	bash launch/setup.sh $(VENV) $(PY_SYS)
	touch $(STAMP)

# Debian packages the demo data is built from (real images, offline).
apt:
	bash launch/apt_demo_packages.sh

demo-data: setup apt
	$(VENV)/bin/mlcd data demo $(ARGS)

demo: setup apt
	$(VENV)/bin/mlcd demo $(ARGS)

# RICE end to end on offline scenes (regions -> cluster -> region labels -> train -> eval-regions).
rice-demo: setup apt
	$(VENV)/bin/mlcd rice-demo $(ARGS)

# MLCD's ablation grid (configs/ablation.yaml; ARGS=--quick for the small l x rho grid).
ablation: setup apt
	$(VENV)/bin/mlcd ablate $(ARGS)

test: setup apt
	$(PY) -m pytest -q tests $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests $(ARGS)

bench: setup apt
	$(PY) -m launch.bench $(ARGS)

# On a CUDA machine, one unattended command (<= 8 min): every stage end to end under torchrun/NCCL,
# then per-GPU rates at K = 1M; PASS/FAIL/SKIP per item, table + JSON in $(OUT). DRY_RUN=1 prints
# the plan, GPU_CHECK_ON_CPU=1 rehearses the same items on CPU. No `setup` dependency: on an
# offline GPU box it runs on the python3 that has torch, with .gpu_bundle (make gpu-bundle) carried.
OUT ?= runs/gpu_check_out
GPU_PY ?= $(shell [ -x $(PY) ] && echo $(PY) || echo python3)
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m launch.gpu_check --out $(OUT) $(ARGS)

# Run here (network + Debian image packages): wheels of what a bare GPU box lacks + small demo shards.
gpu-bundle: setup apt
	VENV=$(VENV) bash launch/gpu_bundle.sh .gpu_bundle

# ruff (pinned in requirements-dev.txt); shellcheck where installed (Debian: apt-get install shellcheck).
lint: setup
	$(VENV)/bin/ruff check pipeline clustering training launch tests
	@if command -v shellcheck >/dev/null; then shellcheck -x launch/*.sh launch/slurm/* .ci/run; \
	else echo "lint: shellcheck not installed, shell scripts not checked"; fi

# mypy (pinned in requirements-dev.txt; settings in pyproject.toml) on the library code.
typecheck: setup
	$(VENV)/bin/mypy pipeline clustering training

# The stages (envcheck: the preflight of a multi-node layout, ARGS="--bytes 1e9").
$(STAGE_TARGETS): setup
	NPROC=$(NPROC) NNODES=$(NNODES) bash launch/torchrun.sh $@ $(CONFIG) $(ARGS)

clean:
	rm -rf runs/debug .pytest_cache
