# kdlab: make install | install-unpinned | lock | run | test | test-slow | bench | check-gpu | study | study-gap | study-zskd | study-converged | lint | docs
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: install install-unpinned lock run test test-slow test-all bench check-gpu study study-gap study-zskd study-converged lint docs clean

install: $(STAMP)

# The exact versions in requirements.lock (pip constraints): a fresh clone gets what produced the README.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -c $(LOCK)
	touch $(STAMP)

# The newest versions the registry serves, ignoring the lock (then `make lock` to pin them).
install-unpinned:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	touch $(STAMP)

# Rewrites requirements.lock from the current .venv (keeps its leading comment lines).
lock:
	test -x $(PY)
	{ sed -n '/^#/!q;p' $(LOCK) 2>/dev/null; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '^(pip|setuptools|wheel|kdlab)=='; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

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

# kdlab's CUDA paths on this machine's GPU(s), one line per check, under 10 minutes; one line and exit 0 without a GPU
check-gpu: install
	$(PY) benchmarks/check_gpu.py $(ARGS)

study: install
	$(PY) -m kdlab.study fashion_mnist --docs $(ARGS)

# the capacity-gap study (studies/capacity_gap.yaml): tables, gain-vs-gap figure, the README's block
study-gap: install
	$(PY) -m kdlab.study capacity_gap --docs $(ARGS)

# the published Fashion-MNIST table reproduced (studies/zskd.yaml): the README's first Results table
study-zskd: install
	$(PY) -m kdlab.study zskd --docs $(ARGS)

# KD where students converge (studies/converged.yaml, 1.5-2 h on a 2-core CPU): tables, gain-vs-gap, README block
study-converged: install
	$(PY) -m kdlab.study converged --docs $(ARGS)

lint: install
	$(VENV)/bin/ruff check kdlab tests benchmarks

# The manual (docs/ + mkdocs.yml) into site/; --strict: a broken link, anchor or API reference fails the build.
docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf outputs .pytest_cache
