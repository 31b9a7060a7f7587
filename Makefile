# Sieve — everything sets itself up: a virtual environment in .venv, installed once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)

.PHONY: demo test lint schemas bench clean deploy-tools load lock audit

# Every package at the version requirements.lock pins (pip constraints).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-cache-dir -c $(LOCK) -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sieve demo

test: $(STAMP) deploy-tools
	$(BIN)/ruff check workers tests load-tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The production stack's checkers (tests/test_deploy_*.py): `docker-compose config` and
# promtool, and the review console's browser tests: chromium driven through chromedriver;
# all from Debian. Installed once (as root, or with sudo); quick when already there.
DEPLOY_TOOLS_APT := docker-compose prometheus chromium chromium-driver
deploy-tools:
	@command -v docker-compose >/dev/null && command -v promtool >/dev/null && \
	  command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -qq --no-install-recommends $(DEPLOY_TOOLS_APT) >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $(DEPLOY_TOOLS_APT); }; }

load: $(STAMP)
	$(BIN)/python load-tests/scaling.py

schemas: $(STAMP)
	$(BIN)/sieve schemas export

bench: $(STAMP)
	$(BIN)/python load-tests/bench_spine.py

clean:
	rm -rf $(VENV) .sieve .pytest_cache

# The lock from pyproject.toml, resolved afresh in a throw-away virtual environment.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[test]'
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

# Known vulnerabilities in the locked versions (pip-audit, PyPI's advisory data; it needs
# pypi.org's JSON API, which CI machines cannot reach: docs/security.md).
audit: $(STAMP)
	$(BIN)/pip install --quiet pip-audit
	$(BIN)/pip-audit -r $(LOCK) --no-deps --disable-pip
