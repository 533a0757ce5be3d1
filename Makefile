# The two commands a new user needs: `make demo` and `make test`. `make docs` builds the site;
# `make bench` measures the overhead.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# setup.py builds the optional C extensions (src/upstream_ops/*.c) into the source tree: a change
# to one is built again by the next make.
BUILD_INPUTS := pyproject.toml setup.py src/upstream_ops/_speedups.c src/upstream_ops/_wsgi_recording.c \
	src/upstream_ops/_asgi_recording.c

$(VENV)/.demo-installed: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.dev-installed: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.demo-installed

$(VENV)/.bench-installed: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/upstream-ops demo

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy src bench

unit: $(VENV)/.dev-installed
	$(BIN)/pytest

test: lint typecheck unit

# The documentation site into site/, warnings as errors (a dead link or a broken API page fails).
# tests/test_docs_site.py runs the same build, so `make test` and CI check it too.
docs: $(VENV)/.dev-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# BENCH_ARGS=--quick for a shorter run; --docs also writes the tables into docs/performance.md.
# wrk comes from Debian when apt-get can install it; without it a bounded Python load generator runs.
bench: $(VENV)/.bench-installed
	@command -v wrk >/dev/null || { [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1; } || \
		echo "wrk not installed: using the Python load generator"
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site build src/*.egg-info src/upstream_ops/*.so
