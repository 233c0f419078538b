# One tool, few verbs. Everything runs inside .venv/ at the repo root.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint format e2e bench clean

install: $(STAMP)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

e2e:
	bash scripts/e2e.sh

bench: install
	$(PY) -m bench.train_throughput
	$(PY) -m bench.time_to_accuracy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
