# One tool, few verbs. Everything runs inside .venv/ at the repo root.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint format e2e data bench bench-gpu clean

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

# The 50,000 CIFAR-10 training JPEGs in class folders, for real runs and the benchmarks. The
# tarball is not part of this repository: it exists on the development machines only (the
# trainer's default, torchvision's CIFAR-10 download, works everywhere).
DATA_TAR ?= ../shared/data/cifar10-train-jpg.tar.gz
data: volumes/data/cifar10/train
volumes/data/cifar10/train:
	@test -f $(DATA_TAR) || { echo "error: $(DATA_TAR) not found (it exists on the development machines only; README.md, Results, says what to use elsewhere)"; exit 2; }
	tar -xzf $(DATA_TAR) -C volumes/data

# Every figure of docs/benchmarks.md, in that order (about 25 minutes on 2 cores): run it on
# an otherwise idle machine. time_to_accuracy publishes the model the serving benchmarks load.
bench: install data
	$(PY) -m bench.train_throughput
	$(PY) -m bench.time_to_accuracy
	$(PY) -m bench.forward --models-dir volumes/bench/models
	$(PY) -m bench.load --start-server --models-dir volumes/bench/models \
		--images volumes/data/cifar10/train --inprocess --baseline
	$(PY) -m bench.reload
	$(PY) -m bench.report

# Every GPU figure in one run (at most 8 minutes), on the lent GPU machine's own python3: no
# venv there; Flask and Gunicorn come from .whl/, the data from .data/ (docs/benchmarks.md).
GPU_PY ?= python3
bench-gpu:
	$(GPU_PY) -m bench.gpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
