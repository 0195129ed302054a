# `make pipeline` and `make test` set up .venv themselves (infra/bootstrap.sh) on first use.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup pipeline test test-fast lock bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml infra/bootstrap.sh
	infra/bootstrap.sh

pipeline: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q --durations=10

test-fast: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m fast

# Re-resolve requirements.lock after changing pyproject.toml (torchvision stays out: its wheel is CUDA-only).
lock:
	uv pip compile pyproject.toml --extra dev --python-version 3.11 --find-links /opt/wheels \
	  --excludes infra/uv-excludes.txt -o requirements.lock --no-header --quiet
