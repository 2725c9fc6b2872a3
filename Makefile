# The README's commands. On a fresh clone with only python3, `make serve` and `make test` (what CI runs,
# .ci/run) each make .venv and install into it what they need: once, and again when pyproject.toml
# changes. PY=python uses the Python on your PATH instead (an environment you manage).
VENV ?= .venv
PY ?= $(VENV)/bin/python
PYTEST_ARGS ?=
TORCH ?= torch==2.13.0
# Where the package index serves CUDA builds of torch (17 nvidia-* packages), the CPU build comes from
# PyTorch's own index: make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP = $(PY) -m pip install --quiet

ifeq ($(PY),$(VENV)/bin/python)
PYTHON := $(VENV)/bin/python
# the venv's tools (protoc-gen-mypy, pgw) for the commands and tests that call them by name
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
else
PYTHON :=
endif

.PHONY: serve install install-triton protos lint format typecheck test demo model-repo bench bench-quick

serve: $(VENV)/.installed-serve  ## install, build and export the demo models once, serve them on :50051
	$(PY) -m gateway serve --demo

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

# Serving exports needs no torch (`pip install -e .`); the demo models are built and exported with it.
$(VENV)/.installed-serve: pyproject.toml $(PYTHON)
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(PIP) -e '.[export]'
	@mkdir -p $(VENV) && touch $@

# nvidia-pytriton only for the tritonserver it bundles: without its dependencies, which pin protobuf < 7
# and numpy < 2 (our Python models move tensors through DLPack, which works with NumPy 2).
$(VENV)/.installed-test: $(VENV)/.installed-serve
	$(PIP) -e '.[export,dev,triton,bench]'
	$(PIP) --no-deps nvidia-pytriton==0.7.0
	@touch $@

install: $(VENV)/.installed-test  ## everything the suite needs, into .venv (or PY's environment)

install-triton:  ## the triton extra and a local tritonserver 2.51 (CPU; Python backend)
	$(PIP) -e '.[triton]'
	$(PIP) --no-deps nvidia-pytriton==0.7.0

protos: $(VENV)/.installed-test  ## regenerate gateway/pb/ from protos/ (messages, gRPC stubs, mypy stubs)
	$(PY) tools/gen_protos.py

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed-test
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

typecheck: $(VENV)/.installed-test
	$(PY) -m mypy

# pytest exits 5 when it collects no test: that is not a failure of the code under test.
test: lint typecheck  ## install what the suite needs, then ruff, mypy --strict and pytest
	$(PY) -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

demo: $(VENV)/.installed-serve  ## build the tiny demo checkpoints into ./out/models
	$(PY) -m gateway models demo out/models

# The demo models as a Triton repository (Python flavor: what nvidia-pytriton's tritonserver runs). The
# configs and model.py files are committed (a test checks them against the generator); weights are not.
model-repo: $(VENV)/.installed-serve  ## export the demo models into model_repo/, ready for `pgw triton up`
	$(PY) -m gateway models demo out/models
	$(PY) -m gateway export out/models/sat-demo out/exports/sat-demo --task token-classification --triton model_repo --triton-flavor python
	$(PY) -m gateway export out/models/distilbert-demo out/exports/distilbert-demo --task embedding --triton model_repo --triton-flavor python
	$(PY) -m gateway export out/models/distilbert-demo out/exports/distilbert-demo-fill-mask --task fill-mask --triton model_repo --triton-flavor python
	$(PY) -m gateway export out/models/nllb-demo out/exports/nllb-demo --task translation --triton model_repo --triton-flavor python

bench: $(VENV)/.installed-test  ## the committed CPU benchmark: full-size models, every task x fp32/int8 with baselines (long)
	$(PY) -m gateway bench --size full --seconds 8 --repeats 3

bench-quick: $(VENV)/.installed-test  ## a one-minute smoke run of the benchmark on the tiny demo models
	$(PY) -m gateway bench --quick
