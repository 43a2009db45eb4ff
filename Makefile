# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   - install, make sample archives, ingest them, show the tables, open a SQL shell
#   make test   - install, lint, run the whole test suite (what .ci/run calls)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[all,test]"
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

demo: install
	$(BIN)/dicomlake demo

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest
