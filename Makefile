# The README's commands. `make test` is what CI runs (.ci/run).
PY ?= python
PYTEST_ARGS ?=

.PHONY: install install-triton protos lint format typecheck test demo model-repo bench bench-quick

install:  ## the package with the export and dev extras (torch CPU: pip install torch first)
	$(PY) -m pip install -e '.[export,dev]'

# nvidia-pytriton only for the tritonserver it bundles: without its dependencies, which pin protobuf < 7
# and numpy < 2 (our Python models move tensors through DLPack, which works with NumPy 2).
install-triton:  ## the triton extra and a local tritonserver 2.51 (CPU; Python backend)
	$(PY) -m pip install -e '.[triton]'
	$(PY) -m pip install --no-deps nvidia-pytriton==0.7.0

protos:  ## regenerate gateway/pb/ from protos/ (messages, gRPC stubs, mypy stubs)
	$(PY) tools/gen_protos.py

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

typecheck:
	$(PY) -m mypy

# pytest exits 5 when it collects no test: that is not a failure of the code under test.
test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

demo:  ## build the tiny demo checkpoints into ./out/models
	pgw models demo out/models

# The demo models as a Triton repository (Python flavor: what nvidia-pytriton's tritonserver runs). The
# configs and model.py files are committed (a test checks them against the generator); weights are not.
model-repo:  ## export the demo models into model_repo/, ready for `pgw triton up`
	pgw models demo out/models
	pgw export out/models/sat-demo out/exports/sat-demo --task token-classification --triton model_repo --triton-flavor python
	pgw export out/models/distilbert-demo out/exports/distilbert-demo --task embedding --triton model_repo --triton-flavor python
	pgw export out/models/distilbert-demo out/exports/distilbert-demo-fill-mask --task fill-mask --triton model_repo --triton-flavor python
	pgw export out/models/nllb-demo out/exports/nllb-demo --task translation --triton model_repo --triton-flavor python

bench:  ## the committed CPU benchmark: full-size models, every task x fp32/int8 with baselines (long)
	pgw bench --size full --seconds 8 --repeats 3

bench-quick:  ## a one-minute smoke run of the benchmark on the tiny demo models
	pgw bench --quick
