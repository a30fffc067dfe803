# llmfleet: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: help demo test test-fast lint format bench system-deps venv clean

help:
	@echo "make demo       run the agent on this machine (real ollama if on PATH, else the simulator)"
	@echo "make test       install what is needed, lint, run every test (CI=true: nothing may skip)"
	@echo "make test-fast  the tests without the slow system tests"
	@echo "make lint       ruff check and format check"
	@echo "make format     ruff format and fix"
	@echo "make bench      the proxy against a direct connection; JSON under bench/results/"

system-deps:
	@scripts/install-system-deps.sh

# the virtual environment is rebuilt when the package's dependencies change
$(BIN)/.installed: agent/pyproject.toml
	@echo "==> creating $(VENV) and installing the agent with its test tools"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e './agent[test]'
	@touch $@

venv: system-deps $(BIN)/.installed

lint: venv
	@echo "==> ruff"
	@$(BIN)/ruff check agent bench
	@$(BIN)/ruff format --check agent bench

format: venv
	@$(BIN)/ruff format agent bench
	@$(BIN)/ruff check --fix agent bench

test: lint
	@echo "==> pytest (CI=$${CI:-false})"
	@cd agent && ../$(BIN)/pytest $(PYTEST_ARGS)

test-fast: PYTEST_ARGS += -m "not slow"
test-fast: test

bench: venv
	@$(BIN)/python bench/bench.py $(BENCH_ARGS)

demo: venv
	@scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache agent/.pytest_cache .ruff_cache
