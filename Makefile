# llmfleet: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# the collection resolves as llmfleet.aws through this link (ansible.cfg's collections_path)
COLLECTION_LINK := .ansible/collections/ansible_collections/llmfleet/aws
EMULATOR_PORT ?= 5000

.PHONY: help demo test test-fast test-agent test-collection test-roles sanity lint format bench emulator emulator-stop \
	bench-store bench-bill system-deps venv controller lock clean

help:
	@echo "make demo       site.yml on the local AWS emulator, then the agent and gateway here: a chat, a wake, a sweep"
	@echo "make test       install what is needed, lint, run every test (CI=true: nothing may skip)"
	@echo "make test-fast  lint and the tests without the slow system tests (no molecule, no sanity)"
	@echo "make venv       .venv with the agent, Ansible and the test tools, and the system packages the tests use"
	@echo "make controller .venv to deploy from (Ansible, the AWS collections), without the test system's packages"
	@echo "make lint       ruff check and format check"
	@echo "make format     ruff format and fix"
	@echo "make bench      the agent, the gateway and a bare relay against a direct connection; JSON in bench/results/"
	@echo "make bench-store  the PostgreSQL store: 10M records, 30-day reports, insert rates (about 5 min)"
	@echo "make bench-bill   the bill: an office day at 100x through the gateway, wake and sweep (about 8 min)"
	@echo "make emulator   start the local AWS emulator on 127.0.0.1:$(EMULATOR_PORT) (make emulator-stop)"
	@echo "make sanity     ansible-test sanity on the built collection"
	@echo "make lock       pin the newest allowed versions in constraints.txt (on purpose; then make test)"

system-deps:
	@scripts/install-system-deps.sh

# the virtual environment is rebuilt when a dependency list or the pinned versions change; every version
# comes from constraints.txt (made by `make lock`), so a fresh machine installs what was tested
$(BIN)/.installed: agent/pyproject.toml requirements.txt requirements-dev.txt constraints.txt
	@echo "==> creating $(VENV): the agent with its test tools, Ansible with the AWS collections, moto"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q -c constraints.txt --upgrade pip
	@$(BIN)/python -m pip install -q -c constraints.txt -e './agent[test]' -r requirements-dev.txt
	@touch $@

# on purpose only: the newest versions the requirements allow, resolved in a throwaway venv, written to
# constraints.txt (then `make venv` installs them; run `make test` before committing the new file)
lock:
	@echo "==> resolving the newest allowed versions in a throwaway venv (a few minutes)"
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q './agent[test]' -r requirements-dev.txt; \
	"$$tmp/venv/bin/python" scripts/lock.py --output constraints.txt

$(COLLECTION_LINK):
	@mkdir -p $(dir $@)
	@ln -sfn ../../../.. $@

venv: system-deps $(BIN)/.installed $(COLLECTION_LINK)

# a controller that only deploys: the same .venv without the test system's packages (podman, PostgreSQL,
# Samba); needs python3 with venv (Debian: python3-venv)
controller: $(BIN)/.installed $(COLLECTION_LINK)

PY_DIRS := agent bench scripts plugins tests

lint: venv
	@echo "==> ruff"
	@$(BIN)/ruff check $(PY_DIRS)
	@$(BIN)/ruff format --check $(PY_DIRS)
	@echo "==> ansible-lint (production profile)"
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ansible-lint -q

format: venv
	@$(BIN)/ruff format $(PY_DIRS)
	@$(BIN)/ruff check --fix $(PY_DIRS)

# the agent's tests first, beside the linters only (in AGENT_WORKERS processes: mostly waiting on their
# agents, simulators and PostgreSQL, some on sub-second deadlines, so no more beside them);
# then the playbook tests, the molecule scenarios (mostly waiting on containers) and sanity two at a time,
# their output interleaved as it comes (each part starts with a ==> line; pytest -ra and molecule end with
# their own summaries)
test: venv
	@$(MAKE) --no-print-directory -j2 lint test-agent
	@$(MAKE) --no-print-directory -j2 test-collection test-roles sanity

# in AGENT_WORKERS processes (pytest-xdist), a test file to a worker: a module's shared agent and a
# worker's PostgreSQL server (the session fixture) are started once per worker, not once per test
AGENT_WORKERS ?= 2
test-agent: venv
	@echo "==> agent tests (CI=$${CI:-false}, $(AGENT_WORKERS) workers)"
	@cd agent && ../$(BIN)/pytest -n $(AGENT_WORKERS) --dist loadfile $(PYTEST_ARGS)

# in COLLECTION_WORKERS processes (pytest-xdist), a test file to a worker: test_site.py (one deployment
# taken through its life, about half of the suite's time) runs beside the others
COLLECTION_WORKERS ?= 2
test-collection: venv
	@echo "==> collection tests: module unit tests, playbooks against the emulator ($(COLLECTION_WORKERS) workers)"
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest tests -n $(COLLECTION_WORKERS) --dist loadfile --durations=8 $(PYTEST_ARGS)

# the host roles on a real systemd (molecule, podman, a debootstrapped Debian image built once)
test-roles: venv
	@echo "==> role tests: molecule on systemd in podman"
	@if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then \
	  if [ "$${CI:-}" = "true" ]; then echo "podman or debootstrap missing" >&2; exit 1; fi; \
	  echo "   skipped: podman or debootstrap is not installed (make system-deps)"; exit 0; \
	fi; \
	scripts/test-image.sh && \
	CONTAINERS_CONF="$(CURDIR)/tests/containers/containers.conf" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/molecule test --all

sanity: venv
	@echo "==> ansible-test sanity"
	@PATH="$(CURDIR)/$(BIN):$$PATH" scripts/sanity.sh

test-fast: PYTEST_ARGS += -m "not slow"
test-fast: lint test-agent test-collection

bench: venv
	@$(BIN)/python bench/bench.py $(BENCH_ARGS)

# on a durable throwaway PostgreSQL; BENCH_STORE_ARGS="--records 1000000" for a shorter run, "--quick" for a
# check that it works
bench-store: venv
	@$(BIN)/python bench/bench_store.py $(BENCH_STORE_ARGS)

bench-bill: venv
	@$(BIN)/python bench/bench_bill.py $(BENCH_BILL_ARGS)

demo: venv
	@scripts/demo.sh

emulator: venv
	@$(BIN)/python scripts/emulator.py start --port $(EMULATOR_PORT)

emulator-stop:
	@$(BIN)/python scripts/emulator.py stop --port $(EMULATOR_PORT)

clean:
	rm -rf $(VENV) .pytest_cache agent/.pytest_cache agent/.hypothesis .ruff_cache
