# digitflow: `make repro` runs the pipeline, `make test` the tests; both create the
# environment first when it is missing or older than requirements.lock / pyproject.toml.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.digitflow-installed
# On machines without internet a local MNIST copy sits beside the checkout.
MNIST_MIRROR ?= $(if $(wildcard ../shared/mnist),../shared/mnist,)
export MNIST_MIRROR
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: env repro test test-all lint bench lock clean-env

env: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

repro: env
	dvc repro

test: env
	$(PY) -m pytest -m "not slow"

test-all: env
	$(PY) -m pytest

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: env
	$(PY) benchmarks/pipeline.py

# Re-pin every dependency from the current environment (after a deliberate upgrade).
lock: env
	$(PY) -m pip freeze --exclude-editable | grep -v '^digitflow' > requirements.lock

clean-env:
	rm -rf $(VENV)
