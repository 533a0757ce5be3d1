# The two commands a new user needs: `make demo` and `make test`. `make docs` builds the site.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/upstream-ops demo

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy src

unit: $(VENV)/.dev-installed
	$(BIN)/pytest

test: lint typecheck unit

# The documentation site into site/, warnings as errors (a dead link or a broken API page fails).
# tests/test_docs_site.py runs the same build, so `make test` and CI check it too.
docs: $(VENV)/.dev-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Write throughput of the stores (PostgreSQL when reachable); results in bench/results/.
bench: $(VENV)/.dev-installed
	$(BIN)/python bench/bench_sinks.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site
