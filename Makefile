# Sieve — everything sets itself up: a virtual environment in .venv, installed once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint schemas bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sieve demo

test: $(STAMP)
	$(BIN)/ruff check workers tests load-tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

schemas: $(STAMP)
	$(BIN)/sieve schemas export

bench: $(STAMP)
	$(BIN)/python load-tests/bench_spine.py

clean:
	rm -rf $(VENV) .sieve .pytest_cache
