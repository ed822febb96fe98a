# kdlab: make install | run | test | test-slow | bench | study | lint
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow test-all bench study lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) -m kdlab $(ARGS)

test: install
	$(PY) -m pytest -m "not slow" $(ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(ARGS)

test-all: install
	$(PY) -m pytest $(ARGS)

bench: install
	$(PY) benchmarks/run.py $(ARGS)

study: install
	$(PY) -m kdlab.study fashion_mnist --docs $(ARGS)

lint: install
	$(VENV)/bin/ruff check kdlab tests benchmarks

clean:
	rm -rf outputs .pytest_cache
