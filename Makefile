# layergrad developer commands. Everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ADDRESS ?= 127.0.0.1:50051
SERVER_ARGS ?=
LOADTEST_ARGS ?=
SOAK_ARGS ?=

.PHONY: setup run serve demo test lint proto proto-check bench loadtest soak clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=77,<81" wheel
	$(PIP) install --no-build-isolation "chainer==7.8.1"
	$(PIP) install -e ".[server,dev]"
	touch $@

setup: $(VENV)/.installed

# Starts a server on a free port, makes a demo call with the SDK, stops it.
run: setup
	$(PY) scripts/demo.py $(SERVER_ARGS)

serve: setup
	$(VENV)/bin/layergrad-server --address $(ADDRESS) $(SERVER_ARGS)

test: setup
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check client server tests scripts
	$(VENV)/bin/ruff format --check client server tests scripts

proto: setup
	$(PY) scripts/gen_proto.py

# Fails when the committed stubs differ from what `make proto` generates.
proto-check: proto
	git diff --exit-code -- client/layergrad/_gen server/layergrad_server/weights/_gen
	test -z "$$(git status --porcelain -- client/layergrad/_gen server/layergrad_server/weights/_gen)"

bench: setup
	$(PY) scripts/bench.py

# N clients for T seconds against one loopback server with a small queue (LOADTEST_ARGS=...).
loadtest: setup
	$(PY) scripts/loadtest.py $(LOADTEST_ARGS)

# Good, bad, slow and idle callers against one server for a bounded time (SOAK_ARGS=...).
soak: setup
	$(PY) scripts/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info server/*.egg-info
