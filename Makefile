# Two commands on a fresh machine:  `make up` runs the whole stack, `make test` passes the suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Deployment checks (checkov, helm-python-sdk, kubernetes-validate, hadolint, actionlint) live in
# a venv of their own: their dependencies would fight the app's pins.
TOOLS_VENV := .venv-tools
PYTEST_ARGS ?=
UV_VERSION := 0.13.8
CHROMIUM_PATH ?= /usr/lib/chromium/chromium-headless-shell
export CHROMIUM_PATH

.PHONY: up test lint typecheck test-db test-deploy venv tools chromium prometheus grafana-schema lock clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	VIRTUAL_ENV=$(VENV) $(BIN)/uv pip install --quiet -r requirements.lock
	@touch $@

tools: $(TOOLS_VENV)/.installed

$(TOOLS_VENV)/.installed: requirements-tools.lock $(VENV)/.installed
	$(BIN)/uv venv --quiet --allow-existing -p $(PYTHON) $(TOOLS_VENV)
	VIRTUAL_ENV=$(TOOLS_VENV) $(BIN)/uv pip install --quiet -r requirements-tools.lock
	@touch $@

# Debian's headless shell renders invoice PDFs; installed with apt-get when missing and we are root.
chromium:
	@if [ -x "$(CHROMIUM_PATH)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium-headless-shell with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell fonts-dejavu-core fonts-liberation >/dev/null; \
	else \
		echo "No browser at $(CHROMIUM_PATH). Install Debian's chromium-headless-shell (sudo apt-get install chromium-headless-shell)" >&2; \
		echo "or point CHROMIUM_PATH at a Chromium/Chrome headless binary: make test CHROMIUM_PATH=/path/to/chrome" >&2; \
		exit 1; \
	fi

# Debian's prometheus package: promtool checks and unit-tests the alert rules, and a real Prometheus
# scrapes the API and the worker in tests/test_metrics_live.py; installed with apt-get when missing and we are root.
prometheus:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing prometheus (promtool) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
		echo "promtool and prometheus are missing. Install Debian's prometheus package (sudo apt-get install prometheus)" >&2; \
		exit 1; \
	fi

# Grafana's dashboard schema (@grafana/schema) and ts-json-schema-generator, pinned in
# ops/grafana/schema/package-lock.json: tests/test_dashboards.py validates ops/grafana/*.json against it.
# Needs Node.js and npm (installed with apt-get when missing and we are root).
GRAFANA_SCHEMA := ops/grafana/schema

grafana-schema: $(GRAFANA_SCHEMA)/node_modules/.installed

$(GRAFANA_SCHEMA)/node_modules/.installed: $(GRAFANA_SCHEMA)/package-lock.json
	@if ! command -v npm >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing nodejs and npm with apt-get"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; \
		else \
			echo "npm is missing. Install Node.js and npm (sudo apt-get install nodejs npm)" >&2; \
			exit 1; \
		fi; \
	fi
	cd $(GRAFANA_SCHEMA) && npm ci --silent
	@touch $@

lock:
	$(BIN)/uv pip compile requirements.in -o requirements.lock -p $(BIN)/python --no-header -q
	$(BIN)/uv pip compile requirements-runtime.in -c requirements.lock -o requirements-runtime.lock -p $(BIN)/python --no-header -q
	$(BIN)/uv pip compile requirements-tools.in -o requirements-tools.lock -p $(BIN)/python --no-header -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy .

# The whole suite: lint, types, then pytest against embedded PostgreSQL (or DATABASE_URL),
# the time-skipping Temporal test server and real headless Chromium, and the deployment checks.
test: venv tools chromium prometheus grafana-schema lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

# Only the database tests, e.g. against an external server: DATABASE_URL=... make test-db
test-db: venv chromium prometheus
	$(BIN)/pytest -m db

# Only the deployment checks (no database): chart, terraform, Dockerfile, workflows.
test-deploy: venv tools
	$(BIN)/pytest -m deploy $(PYTEST_ARGS)

up: venv chromium
	$(BIN)/python -m devstack.up

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .data $(GRAFANA_SCHEMA)/node_modules
