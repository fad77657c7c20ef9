# prunelab: `make demo` runs the quickstart sweep, `make test` runs the test suite.
# Both create .venv on first use (idempotent): CPU torch when no CUDA is present.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing torch with CUDA"; $(BIN)/pip install -q "torch>=2.4,<2.14"; \
	else \
		echo "no CUDA: installing CPU torch 2.13.0"; $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e ".[dev,conformance]"
	$(BIN)/pip install -q --no-deps lmms-eval==0.7.3
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prunelab sweep quickstart
	@echo
	@echo "Browse the runs:  $(BIN)/prunelab ui   (then open the link it prints for the sweep's runs table)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf prunelab-runs .pytest_cache .ruff_cache
