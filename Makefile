# Two commands on a fresh machine: `make demo` and `make test`. Both create the venv if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# a failed install fails the target (pipefail: pip's status, not the filter's; sed exits 0 even
# when it drops every line, where grep -v would fail)
SHELL       := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTEST      := $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder
QUIET_PIP   := sed '/is ignored: it is neither/d'
# the versions CI passed with (regenerate after changing a dependency: see its header)
CONSTRAINTS := constraints.txt

.PHONY: demo test test-slow env clean ui-check

env: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev,hf]' 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import torch, prefect, mlflow, sklearn, onnxruntime, typer, transformers" 
	touch $@

demo: $(STAMP)
	$(BIN)/distill run configs/digits.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check distill flows tasks tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy
	$(PYTEST) -m "not slow"

# The end-to-end set (marker `slow`: several processes, servers, signals, full CLI runs, 20 s or
# more each): CI runs it after `make test` (.ci/run); `make test` stays within 8 minutes.
test-slow: $(STAMP)
	$(PYTEST) -m slow

# MLflow and Prefect UIs in headless Chromium (benchmarks/ui_check.py); not part of `make test`
ui-check: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/python benchmarks/ui_check.py --quick --out ui-check

clean:
	rm -rf $(VENV) mlruns .prefect *.egg-info
