# The two commands of README.md: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv when missing and install the package with its test extras into it.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nlnet-installed

.PHONY: install test test-fast demo demo-quick bench lint format clean

$(PY):
	$(shell command -v $(PYTHON) >/dev/null 2>&1 && echo $(PYTHON) || echo python3) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -x -q

demo: $(STAMP)
	$(VENV)/bin/nlnet demo --out runs/demo

demo-quick: $(STAMP)
	$(VENV)/bin/nlnet demo --quick --out runs/demo-quick

bench: $(STAMP)
	$(PY) benchmarks/nonlocal_op.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
