# layergrad developer commands. Everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ADDRESS ?= 127.0.0.1:50051
SERVER_ARGS ?=
LOADTEST_ARGS ?=
SOAK_ARGS ?=

.PHONY: help setup client-env run serve demo test lint proto proto-check bench bench-explain loadtest soak clean

# Plain `make` prints this list and installs nothing.
help:
	@echo "layergrad: make TARGET"
	@echo "  setup       create .venv and install Chainer, the server and the SDK (editable) with dev tools"
	@echo "  run         install without dev tools, start a server on a free port, demo every call, stop it"
	@echo "  serve       install without dev tools, run the server on $(ADDRESS) (ADDRESS=..., SERVER_ARGS=...)"
	@echo "  test        the test suite (installs the dev tools; the KServe v2 client tests build .venv-clients)"
	@echo "  client-env  build .venv-clients: tritonclient[grpc] and kserve, for the KServe v2 client tests"
	@echo "  lint        ruff check and format check"
	@echo "  proto       regenerate the committed stubs; proto-check fails if they are stale"
	@echo "  bench       service vs in-process Chainer; loadtest: N clients against one server"
	@echo "  soak        idle, stalled, late, cancelled and hostile callers against one server"
	@echo "  clean       remove .venv and build outputs"

# The server and SDK only (make run, make serve); the dev install below includes it.
$(VENV)/.installed-server: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh --venv $(VENV)
	touch $@

$(VENV)/.installed: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh --venv $(VENV) --dev
	touch $@ $(VENV)/.installed-server

setup: $(VENV)/.installed

# Starts a server on a free port, makes a demo call with the SDK, stops it.
run: $(VENV)/.installed-server
	$(PY) scripts/demo.py $(SERVER_ARGS)

serve: $(VENV)/.installed-server
	$(VENV)/bin/layergrad-server --address $(ADDRESS) $(SERVER_ARGS)

# The real KServe v2 clients need protobuf < 7: their own environment, reused while current.
# The tests build it themselves when needed; this target builds it ahead.
client-env:
	scripts/client_env.sh

test: setup
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check client server tests scripts
	$(VENV)/bin/ruff format --check client server tests scripts

proto: setup
	$(PY) scripts/gen_proto.py

# Fails when the committed stubs differ from what `make proto` generates.
proto-check: proto
	git diff --exit-code -- client/layergrad/_gen server/layergrad_server/_gen server/layergrad_server/weights/_gen
	test -z "$$(git status --porcelain -- client/layergrad/_gen server/layergrad_server/_gen server/layergrad_server/weights/_gen)"

bench: setup
	$(PY) scripts/bench.py
	$(PY) scripts/bench_models.py
	$(PY) scripts/bench_explain.py

# Explain: SmoothGrad via one call vs SDK calls, Integrated Gradients, Grad-CAM (BENCH_EXPLAIN_ARGS=--quick).
bench-explain: setup
	$(PY) scripts/bench_explain.py $(BENCH_EXPLAIN_ARGS)

# N clients for T seconds against one loopback server with a small queue (LOADTEST_ARGS=...).
loadtest: setup
	$(PY) scripts/loadtest.py $(LOADTEST_ARGS)

# Good, bad, slow and idle callers against one server for a bounded time (SOAK_ARGS=...).
soak: setup
	$(PY) scripts/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .venv-clients build *.egg-info client/*.egg-info server/*.egg-info
