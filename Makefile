# Two commands on a fresh machine: `make demo` and `make test`. Both create the venv if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, prefect, mlflow, sklearn, onnxruntime, typer" 
	touch $@

demo: $(STAMP)
	$(BIN)/distill run configs/digits.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check flows tasks tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) mlruns .prefect *.egg-info
