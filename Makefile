# Backend Portal: `make run` starts the portal, `make test` runs the whole test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# The PostgreSQL the suite runs against (a test_ database is created and dropped on it).
TEST_DATABASE_URL ?= postgres://root@127.0.0.1:5432/postgres
# Debian packages the tests drive for real (prometheus: its promtool checks the alert rules).
TEST_APT_PACKAGES := docker-registry skopeo umoci chromium prometheus

.PHONY: run test lint bench venv test-venv test-deps system-deps clean

# `make run` installs what running needs; the test tools (browser driver, fuzzers, linters) come in
# only for `make test`, `make lint` and `make bench`.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

test-venv: $(VENV)/.installed-test

run: venv
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput --verbosity 0
	$(PY) manage.py ensure_admin
	PORT=$(PORT) $(PY) manage.py serve

system-deps:
	@missing=$$(for p in $(TEST_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

test-deps: test-venv system-deps

lint: test-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: test-deps lint
	$(PY) manage.py check --fail-level WARNING
	$(PY) manage.py makemigrations --check --dry-run
	DATABASE_URL=$(TEST_DATABASE_URL) $(VENV)/bin/pytest
	DATABASE_URL= $(VENV)/bin/pytest --db-pass=sqlite

bench: test-deps $(VENV)/.installed-bench
	$(PY) -m bench

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
