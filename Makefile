# The two commands: `make demo` and `make test`. Each sets itself up in a local .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: $(BIN)/python pyproject.toml
	$(PIP) -e .
	touch $@

$(VENV)/.all: $(BIN)/python pyproject.toml constraints-test.txt
	$(PIP) -c constraints-test.txt -e '.[all,test]'
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	rm -rf demo-checkpoints
	$(BIN)/checkpointer demo demo-checkpoints

lint: $(VENV)/.all
	$(BIN)/ruff check .

typecheck: $(VENV)/.all
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(VENV)/.all
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) demo-checkpoints build *.egg-info
