# The README's commands. `make test` is what CI runs (.ci/run).
PY ?= python
PYTEST_ARGS ?=

.PHONY: install protos lint format typecheck test demo

install:  ## the package with the export and dev extras (torch CPU: pip install torch first)
	$(PY) -m pip install -e '.[export,dev]'

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
