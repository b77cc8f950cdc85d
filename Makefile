# Two entry points: `make quickstart` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-all setup clean

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch, pinned: a bare `torch` requirement pulls a multi-GB CUDA build.
	# On NPU/CUDA machines install the matching torch yourself first (docs/ascend.md).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# Community triton runs the Triton kernel tests under TRITON_INTERPRET=1 on CPU.
	# Skipped where a triton is already present: on Ascend that is triton-ascend,
	# which community triton would overwrite (they cannot coexist).
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q "triton>=3.1"
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/npu-rft quickstart

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
