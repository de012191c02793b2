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

.PHONY: env repro test test-fast lint bench exps lock clean-env browser

env: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

repro: env
	dvc repro

# Every test (what .ci/run calls); `make test-fast` skips the ones marked slow (dvc repro end to
# end, the retrain flows, the temporary Prefect server, the Dask cluster): the inner loop.
test: env
	$(PY) -m pytest

test-fast: env
	$(PY) -m pytest -m "not slow"

# Debian's Chromium for tests/test_api_browser.py, which Playwright (requirements.lock) drives
# as it is: no browser download. Needs root (CI runs as root); without it the test is skipped.
browser:
	@command -v chromium >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: env
	$(PY) benchmarks/pipeline.py

# `make exps`: the experiments of one pipeline model (MODEL=seed for the other) as a table
# that fits 100 columns: test accuracy, epochs, batch size, lr (`digitflow exps --help`).
MODEL ?= robust
exps: env
	digitflow exps --model $(MODEL)

# Re-pin every dependency from the current environment (after a deliberate upgrade).
lock: env
	$(PY) -m pip freeze --exclude-editable | grep -v '^digitflow' > requirements.lock

clean-env:
	rm -rf $(VENV)
