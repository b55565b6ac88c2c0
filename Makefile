# Everything a fresh machine needs: `make run` and `make test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The TypeScript SDK client of tests/test_interop_typescript.py, exactly as package-lock.json
# pins it; reinstalled whenever the lock file changes. Only the tests need Node; `make run` never does.
INTEROP := tests/interop
INTEROP_STAMP := $(INTEROP)/node_modules/.installed

$(INTEROP_STAMP): $(INTEROP)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: the TypeScript interop test needs Node.js 20+ with npm" >&2; exit 1; }
	npm ci --prefix $(INTEROP) --no-audit --no-fund
	touch $@

# The browser tests (tests/test_dashboard_browser.py) drive Debian's Chromium through
# Playwright; Playwright's own browser download is never used.
CHROMIUM := /usr/bin/chromium
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

$(VENV)/.dev: requirements-dev.txt requirements.txt $(VENV)/.runtime | $(CHROMIUM) $(INTEROP_STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	else echo "$(CHROMIUM) is missing: install Debian's chromium as root (apt-get install -y chromium)" >&2; exit 1; fi; \
	$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
	@test -x $(CHROMIUM) || { echo "apt-get installed no $(CHROMIUM)" >&2; exit 1; }

# The gateway on SQLite in ./var; local sign-in unless an IdP client is configured.
run: $(VENV)/.runtime
	@mkdir -p var
	@if [ -z "$$MCPGW_OIDC_CLIENT_ID" ] && [ -z "$$MCPGW_DEV_LOGIN" ]; then export MCPGW_DEV_LOGIN=1; fi; \
	MCPGW_STORAGE=$${MCPGW_STORAGE:-sqlite:///var/gateway.db} MCPGW_UPSTREAM_ALLOW=$${MCPGW_UPSTREAM_ALLOW:-127.0.0.0/8} \
	exec $(PY) gateway.py serve

test: $(VENV)/.dev
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

bench: $(VENV)/.dev
	$(PY) bench/token_endpoint.py

clean:
	rm -rf $(VENV) .pytest_cache $(INTEROP)/node_modules
