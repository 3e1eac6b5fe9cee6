# Two commands for a newcomer: `make test` and `make serve`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SSD_PORT ?= 8000
# loopback only; `make serve SSD_HOST=0.0.0.0` (with SSD_API_TOKEN) to expose it
SSD_HOST ?= 127.0.0.1

.PHONY: install test test-unit test-integration tools lint serve bench clean

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

INTEGRATION_TIMEOUT_S ?= 900
test-integration: $(STAMP) tools
	timeout $(INTEGRATION_TIMEOUT_S) $(PY) -m pytest tests/integration -m integration -n 2 --dist loadgroup --timeout 600

serve: $(STAMP)
	# python -m app: uvicorn with a graceful SIGTERM that exits 0 after the final checkpoint
	SSD_HOST=$(SSD_HOST) SSD_PORT=$(SSD_PORT) $(PY) -m app

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
