# One command set for developers, the README and CI.
PY_BOOT ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install install-base lint format typecheck test test-fast bench demo clean

$(PY):
	$(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned first: 2.13.0 is the CPU build; anything unpinned pulls a multi-GB CUDA build.
install: $(PY)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[all,dev]"

lint:
	$(PY) -m ruff check orchestrator worker tests bench
	$(PY) -m ruff format --check orchestrator worker tests bench

format:
	$(PY) -m ruff format orchestrator worker tests bench
	$(PY) -m ruff check --fix orchestrator worker tests bench

typecheck:
	$(PY) -m mypy orchestrator worker

test:
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast:
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench:
	$(PY) -m bench

demo:
	$(VENV)/bin/cotune run examples/tiny/sweep.yaml --out out/tiny

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
