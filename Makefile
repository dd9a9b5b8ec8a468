# Tandem developer commands. `make demo` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: help setup system-tools cluster-build test-tools demo demo-down test test-unit test-e2e test-lifecycle lint typecheck crds clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP) system-tools ## create .venv (operator, workloads, dev tools) and install promtool

# Debian packages the tests and the demo use, installed with apt-get (as root, or through sudo) when a
# command is missing. prometheus: promtool checks /metrics output and alert rules; the server backs the
# metrics tests. The real node (`tandem cluster up --real-node`): containerd (+ ctr) and runc run the
# pods, containernetworking-plugins (bridge, host-local, portmap, loopback in /usr/lib/cni) wire them,
# iptables and conntrack serve kube-proxy (nft lets `down` drop the tables iptables-nft made), umoci and
# busybox-static make the node's local images (pause, busybox). buildah and debootstrap build Tandem's own
# images without a Docker daemon (`tandem images build`, docs/images.md). hey (an HTTP load generator)
# drives the demo's and the lifecycle test's model server.
SYSTEM_PACKAGES := prometheus containerd runc containernetworking-plugins iptables nftables conntrack umoci busybox-static buildah debootstrap hey
SYSTEM_COMMANDS := promtool containerd ctr containerd-shim-runc-v2 runc iptables nft conntrack umoci /usr/lib/cni/bridge /bin/busybox buildah /usr/sbin/debootstrap hey

system-tools:
	@missing=; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	[ -z "$$missing" ] || { \
	  echo "installing Debian's $(SYSTEM_PACKAGES) (missing:$$missing)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	  for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || { echo "error: $$c is still missing: install Debian's $(SYSTEM_PACKAGES)"; exit 1; }; done; }

cluster-build: setup ## build (once, then cached) the pinned Kubernetes, etcd, kwok and real-node binaries
	$(BIN)/tandem cluster build --real-node

test-tools: setup ## build (once, then cached) what only the tests use: helm and the coscheduling scheduler
	$(BIN)/python -m tandem.devcluster.helm build
	$(BIN)/python -m tandem.devcluster.gangscheduler build

demo: cluster-build ## a model's life on a local cluster with a real node: train, crash, recover, serve, scale, cost
	$(BIN)/python -m tandem.demo

demo-down: setup ## stop everything the demo started (cluster, real node, Prometheus, operators)
	$(BIN)/python -m tandem.demo --down

test: cluster-build test-tools ## every test: unit, chart (helm), serving (real HTTP), training (real Ray), metrics (real Prometheus), end-to-end (real control plane), lifecycle (real node)
	$(BIN)/python -m pytest tests/unit
	$(BIN)/python -m pytest tests/chart
	$(BIN)/python -m pytest tests/storage
	$(BIN)/python -m pytest tests/serve
	$(BIN)/python -m pytest tests/train
	$(BIN)/python -m pytest tests/metrics
	$(BIN)/python -m pytest tests/e2e
	$(BIN)/python -m pytest tests/lifecycle

test-unit: setup ## unit tests only (no cluster)
	$(BIN)/python -m pytest tests/unit

test-e2e: cluster-build test-tools ## end-to-end tests only
	$(BIN)/python -m pytest tests/e2e

test-lifecycle: cluster-build ## the lifecycle on a real node only (builds the images once, then cached)
	$(BIN)/python -m pytest tests/lifecycle

typecheck: setup ## mypy --strict
	$(BIN)/mypy

lint: setup typecheck ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

crds: setup ## regenerate manifests/crds and the reference in docs/api.md from the API models
	$(BIN)/tandem crds --output-dir manifests/crds --docs docs/api.md
	$(BIN)/python -m tandem.devcluster.helm install-yaml

clean: ## remove the virtualenv and build outputs (the control-plane cache stays)
	rm -rf $(VENV) .build build *.egg-info
