# `make install` builds .venv; `make serve` serves the demo model; `make test` lints, builds the docs and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the quick start exports one PORT for make serve and curl alike
SSD_PORT ?= $(or $(PORT),8000)
# loopback only; `make serve SSD_HOST=0.0.0.0` (with SSD_API_TOKEN) to expose it
SSD_HOST ?= 127.0.0.1

.PHONY: install test test-unit test-integration tools label-studio lint docs serve bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# plain pip, not uv/poetry: pip takes torch/torchvision from the local wheel store
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# ruff, then the import contracts of pyproject.toml ([tool.importlinter]: the layering of docs/ARCHITECTURE.md)
lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

# Unit tests first, then the tests that drive real outside tools (Prometheus, promtool, docker-compose,
# schemathesis) against a live server, under their own time limit.
test: test-unit test-integration

test-unit: $(STAMP) lint
	$(PY) -m pytest -n 2 --dist loadgroup -m "not integration"

# Installs Debian's prometheus, docker-compose and nginx when missing; never fails (tests then skip, saying why).
tools:
	./deploy/scripts/install-tools.sh

# Label Studio 1.23 from PyPI into its own .venv-label-studio (150 s, 1 GB, once); never fails: without PyPI the
# Label Studio test skips, saying why.
label-studio:
	./deploy/scripts/install-label-studio.sh

INTEGRATION_TIMEOUT_S ?= 900
test-integration: $(STAMP) tools label-studio
	timeout $(INTEGRATION_TIMEOUT_S) $(PY) -m pytest tests/integration -m integration -n 2 --dist loadgroup --timeout 600

# With no SSD_MODEL and no SSD_WEIGHTS given, `make serve` serves the shipped demo model (ssd-small trained
# on the synthetic shapes, ssd_core/models/weights/) with its own checkpoint directory, so that a later
# `SSD_MODEL=ssd300 make serve` does not find the demo's checkpoints in ./checkpoints.
ifeq ($(origin SSD_MODEL)$(origin SSD_WEIGHTS),undefinedundefined)
serve: export SSD_MODEL = ssd-small
serve: export SSD_NUM_CLASSES = 4
serve: export SSD_CLASS_NAMES = shapes
serve: export SSD_WEIGHTS = demo
serve: export SSD_CHECKPOINT_DIR ?= checkpoints/demo
endif
serve: $(STAMP)
	# python -m app: uvicorn with a graceful SIGTERM that exits 0 after the final checkpoint
	SSD_HOST=$(SSD_HOST) SSD_PORT=$(SSD_PORT) $(PY) -m app

# the docs site from docs/ (mkdocs.yml), strict and offline; `make test` builds it too (tests/test_docs.py).
# `$(PY) docs/generate_tables.py` regenerates its settings and metrics tables.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
