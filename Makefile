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
EXTRAS ?= dev,lmeval,bnb,triton
PYTEST_ARGS ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup toolchains demo demo-tiny test test-slow test-all lint report fetch-model selfcheck bench-generation clean-venv

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

# System tools for judging generated code: bubblewrap (the sandbox), Go (BabelCode Go); javac/java
# and g++ come with the machine image. Installed with apt when missing and we are root; otherwise a
# note says what to install (those tests then skip, unless QUANTLAB_REQUIRE_SANDBOX=1, as in CI).
TOOL_PACKAGES := bwrap:bubblewrap go:golang-go javac:default-jdk-headless g++:g++
toolchains:
	@missing=""; for pair in $(TOOL_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }; \
	  else echo "note: missing$$missing; install them (e.g. sudo apt-get install$$missing) to run the sandbox/Go tests" >&2; fi; \
	fi

fetch-model: setup
	$(BIN)/python scripts/fetch_demo_model.py

demo: setup fetch-model
	$(BIN)/python -m quantlab

demo-tiny: setup
	$(BIN)/python -m quantlab +exp=demo_tiny

# Offline CPU suite. pytest exits 5 when it collects no test: that fails here, as it should.
test: setup toolchains
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# ruff (rules in pyproject.toml: a noqa names an enabled rule) and mypy over src/ (config in pyproject.toml)
lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy

test-slow: setup toolchains
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-all: setup toolchains
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# sandbox self-check: 164 canonical HumanEval solutions pass, wrong and hostile completions are contained
selfcheck: setup toolchains
	$(BIN)/python -m quantlab.execution.selfcheck

bench-generation: setup fetch-model
	$(BIN)/python scripts/bench_generation.py

report: setup
	$(BIN)/python -m quantlab.report results

clean-venv:
	rm -rf $(VENV)
