# Tandem developer commands. `make demo` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: help setup cluster-build demo demo-down test test-unit test-e2e lint typecheck crds clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP) ## create .venv with the operator, the dev cluster and the dev tools

cluster-build: setup ## build (once, then cached) the pinned Kubernetes, etcd and kwok binaries
	$(BIN)/tandem cluster build

demo: cluster-build ## start the local cluster and the operator, apply the examples, show kubectl get
	$(BIN)/python -m tandem.demo

demo-down: setup ## stop the demo operator and the local cluster
	$(BIN)/python -m tandem.demo --down

test: cluster-build ## run every test: unit, then end-to-end on a real control plane
	$(BIN)/python -m pytest tests/unit
	$(BIN)/python -m pytest tests/e2e

test-unit: setup ## unit tests only (no cluster)
	$(BIN)/python -m pytest tests/unit

test-e2e: cluster-build ## end-to-end tests only
	$(BIN)/python -m pytest tests/e2e

typecheck: setup ## mypy --strict
	$(BIN)/mypy

lint: setup typecheck ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

crds: setup ## regenerate manifests/crds and the reference in docs/api.md from the API models
	$(BIN)/tandem crds --output-dir manifests/crds --docs docs/api.md

clean: ## remove the virtualenv and build outputs (the control-plane cache stays)
	rm -rf $(VENV) .build build *.egg-info
