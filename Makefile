# One command set for developers, the README and CI.
PY_BOOT ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# Stamp of a finished install: every target that runs code depends on it, so `make test` and
# `make demo` work on a fresh clone; it is redone when pyproject.toml changes.
INSTALLED := $(VENV)/.cotune-installed

.PHONY: install lint format typecheck test test-fast bench bench-quality demo lock clean

$(PY):
	$(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned first: 2.13.0 is the CPU build; anything unpinned pulls a multi-GB CUDA build.
$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $@

# checkov (tests/deploy/test_checkov.py) in a virtualenv of its own: its pins (boto3,
# packaging, networkx) would downgrade the project's.
CHECKOV_VERSION := 3.3.30
CHECKOV := build/tools/checkov/bin/checkov
$(CHECKOV):
	rm -rf build/tools/checkov
	$(PY_BOOT) -m venv build/tools/checkov
	build/tools/checkov/bin/pip install -q --upgrade pip
	build/tools/checkov/bin/pip install -q "checkov==$(CHECKOV_VERSION)"

install: $(INSTALLED) $(CHECKOV)

lint: $(INSTALLED)
	$(PY) -m ruff check orchestrator worker tests bench
	$(PY) -m ruff format --check orchestrator worker tests bench

format: $(INSTALLED)
	$(PY) -m ruff format orchestrator worker tests bench
	$(PY) -m ruff check --fix orchestrator worker tests bench

# mypy cannot follow the editable install's import hook, so it checks a link tree that spells
# the installed names (cotune/orchestrator -> orchestrator/, cotune/worker -> worker/).
TYPECHECK_TREE := build/typecheck
typecheck: $(INSTALLED)
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/cotune
	ln -s $(CURDIR)/orchestrator $(TYPECHECK_TREE)/cotune/orchestrator
	ln -s $(CURDIR)/worker $(TYPECHECK_TREE)/cotune/worker
	cd $(TYPECHECK_TREE) && MYPYPATH=. $(CURDIR)/$(PY) -m mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p cotune.orchestrator -p cotune.worker

test: $(INSTALLED) $(CHECKOV)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(INSTALLED) $(CHECKOV)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(INSTALLED)
	$(PY) -m bench

# Result quality (bench/quality/): federated rounds against central training, with its
# tables in docs/quality.md and the plot docs/images/quality.png.
bench-quality: $(INSTALLED)
	$(PY) -m bench.quality

demo: $(INSTALLED)
	$(VENV)/bin/cotune run examples/tiny/sweep.yaml --out out/tiny

# deploy/docker/requirements.lock: the pins both images install with (deploy/docker/lock.py).
lock: $(INSTALLED)
	$(PY) deploy/docker/lock.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
