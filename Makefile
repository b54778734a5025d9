# quantlab: `make demo` (set up, fetch the demo model, run the default experiment, print a table)
# and `make test` (set up when needed, run the offline CPU test suite).
#
# torch is installed FIRST and then pinned through a generated constraints file, so no dependency
# can replace it with another build. CPU default: torch==2.13.0. For a CUDA build, e.g.:
#   make demo TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url <your CUDA wheel index>"
# or create .venv yourself with the torch you want and `touch .venv/.torch-installed`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= dev
PYTEST_ARGS ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup demo demo-tiny test test-slow test-all report fetch-model clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.torch-installed: | $(BIN)/python
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	touch $@

# constraints pin exactly the torch that is installed (CPU or CUDA build)
$(VENV)/constraints.txt: $(VENV)/.torch-installed
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $@

$(VENV)/.installed: pyproject.toml $(VENV)/constraints.txt
	$(PIP) install -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

fetch-model: setup
	$(BIN)/python scripts/fetch_demo_model.py

demo: setup fetch-model
	$(BIN)/python -m quantlab

demo-tiny: setup
	$(BIN)/python -m quantlab +exp=demo_tiny

# Offline CPU suite. pytest exits 5 when it collects no test: that fails here, as it should.
test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

report: setup
	$(BIN)/python -m quantlab.report results

clean-venv:
	rm -rf $(VENV)
