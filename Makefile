# Two commands for a newcomer: `make test` and `make serve`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SSD_PORT ?= 8000
SSD_HOST ?= 0.0.0.0

.PHONY: install test lint serve bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# plain pip, not uv/poetry: pip takes torch/torchvision from the local wheel store
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -n 2 --dist loadgroup

serve: $(STAMP)
	$(PY) -m uvicorn app.main:app --host $(SSD_HOST) --port $(SSD_PORT)

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
