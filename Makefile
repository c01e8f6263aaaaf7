# Fleet developer entry points. Every target sets up what it needs first, so
# `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV   ?= $(CURDIR)/.venv
PY     := $(VENV)/bin/python
BUF    := node_modules/.bin/buf
PROTOS := $(wildcard protos/fleet/v1/*.proto)
# PostgreSQL for the tests that need it; unset it to skip them (CI=true makes a
# missing server a failure instead).
FLEET_TEST_POSTGRES_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test
export FLEET_TEST_POSTGRES_URL

.PHONY: help setup test-tools lock test test-dist dist soak lint proto proto-check proto-breaking fmt demo clean \
	console-vendor console-check console-lint

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# Python dependencies come from requirements.lock only: every package, direct
# and transitive, pinned with the hashes of its files, so a fresh machine
# installs exactly what the tests passed with (pip refuses anything else).
# Fleet itself is installed editable on top, without build isolation (its
# build backend is in the lock too). The stamp makes setup idempotent and
# cheap when neither file changed.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --only-binary :all: -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# `npm ci` installs exactly the lockfile and never rewrites it.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

setup: $(VENV)/.installed node_modules/.installed  ## create .venv and install Fleet with dev tools, and buf

# Re-resolve requirements.lock from pyproject.toml on purpose: new or changed
# dependencies are added, the other pins stay. `make lock UPGRADE=grpcio`
# also moves grpcio (and what it needs) to the newest release;
# `make lock UPGRADE=all` moves everything.
# requirements-runtime.lock is the subset `make dist` packs: pyproject's
# runtime dependencies only, constrained to the pins of requirements.lock so
# the artifact runs exactly what the tests passed with.
lock: setup  ## update requirements.lock and requirements-runtime.lock from pyproject.toml (UPGRADE=pkg|all)
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
	    --generate-hashes --quiet -o requirements.lock \
	    $(if $(filter all,$(UPGRADE)),--upgrade,$(addprefix --upgrade-package ,$(UPGRADE)))
	$(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 \
	    --generate-hashes --quiet -c requirements.lock -o requirements-runtime.lock

demo: setup  ## run a manager and two daemons with example agents, and a fleetctl tour (Ctrl-C stops)
	scripts/demo.sh

# Debian packages some tests need, installed here only when missing and only as
# root (without them those tests skip with the reason, and fail under CI):
# Chromium for the console's browser tests (tests/browser; Playwright's own
# browser download is never used: it is not reachable from every machine), and
# libfaketime to step a manager's wall clock (tests/faults/test_clock_step.py).
CHROMIUM ?= /usr/bin/chromium
LIBFAKETIME ?= /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1

test-tools:  ## install Debian's chromium and faketime for the tests when missing (root: apt-get)
	@missing=""; \
	[ -x "$(CHROMIUM)" ] || missing="$$missing chromium fonts-dejavu-core"; \
	[ -e "$(LIBFAKETIME)" ] || missing="$$missing faketime"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ]; then \
	    echo "make test-tools: installing$$missing needs root:" \
	        "run 'sudo apt-get install$$missing'; until then the tests that need them skip" >&2; \
	    exit 0; \
	fi; \
	echo "make test-tools: installing Debian's$$missing for the tests"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && apt-get install -y -qq $$missing >/dev/null

# The suite waits on child processes, timers and the network about half of the
# time, so two workers per core keep the cores busy (a 2-core CI: 23 -> ~17
# min); capped at 8 so a big machine stays within PostgreSQL's connections.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n * 2 > 8 ? 8 : n * 2 )))

test: setup test-tools  ## run the whole test suite (but tests/dist: make test-dist; TEST_WORKERS=n)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 --ignore=tests/dist

# The artifact hosts install (docs/install.md): the wheel, a zipapp with every
# runtime dependency for this Python and architecture, install.sh, a tarball.
# Downloads the pinned wheels, so it is not part of `make test`.
dist: setup  ## build dist/: wheel, self-contained zipapp, install.sh, tarball for hosts
	packaging/build-dist.sh $(PY)

# Installs the tarball in a network namespace that reaches only a manager
# (root and `ip netns`; skipped without them, failed under CI=true).
test-dist: dist  ## build the artifact, then install and enroll it offline in a network namespace
	FLEET_DIST_TARBALL="$$(ls $(CURDIR)/dist/fleet-*.tar.gz)" $(PY) -m pytest tests/dist

soak: setup  ## long fault runs: manager kill -9 under 1,000 simulated daemons + every fault test
	FLEET_FAULT_NODES=1000 $(PY) -m pytest tests/faults -s --timeout 900

lint: setup proto-check console-check console-lint  ## ruff, mypy, buf lint/format, shellcheck, generated-code freshness
	$(VENV)/bin/shellcheck packaging/*.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	cd protos && ../$(BUF) lint && ../$(BUF) format --diff --exit-code

fmt: setup  ## apply ruff and buf formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	cd protos && ../$(BUF) format -w

proto: setup  ## regenerate fleet/v1 (messages, gRPC stubs, mypy stubs) offline
	rm -f fleet/v1/*_pb2*.py fleet/v1/*_pb2*.pyi
	PATH="$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	    --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)

proto-check: proto  ## fail if the committed generated code is stale
	@git diff --exit-code --stat -- fleet/v1 || { echo "fleet/v1 is stale: run 'make proto' and commit the result" >&2; exit 1; }
	@test -z "$$(git ls-files --others --exclude-standard fleet/v1)" || { echo "fleet/v1 has uncommitted generated files: run 'make proto' and commit them" >&2; exit 1; }

# The console's third-party files are committed (fleetctl serves them offline, and a
# host's pip install has no npm); they are copies of the npm lockfile's packages.
CONSOLE_VENDOR := fleetctl/ui/static/vendor
console-vendor: node_modules/.installed  ## copy the console's pinned third-party assets from node_modules
	cp node_modules/htm/preact/standalone.module.js $(CONSOLE_VENDOR)/preact-htm.mjs
	cp node_modules/htm/LICENSE $(CONSOLE_VENDOR)/LICENSE.htm
	cp node_modules/uplot/dist/uPlot.esm.js $(CONSOLE_VENDOR)/uplot.mjs
	cp node_modules/uplot/dist/uPlot.min.css $(CONSOLE_VENDOR)/uplot.css
	cp node_modules/uplot/LICENSE $(CONSOLE_VENDOR)/LICENSE.uplot

console-check: console-vendor  ## fail if the vendored console assets differ from the npm lockfile's
	@git diff --exit-code --stat -- $(CONSOLE_VENDOR) || { echo "$(CONSOLE_VENDOR) differs from node_modules: run 'make console-vendor' and commit the result" >&2; exit 1; }

# The console has no build step, so its modules are only parsed when a browser
# loads them: parse each here. And fleet data must never become HTML: refuse
# the APIs that would make it so (comments aside).
CONSOLE_JS := $(wildcard fleetctl/ui/static/js/*.js fleetctl/ui/static/js/pages/*.js)
console-lint:  ## parse every console module; refuse APIs that turn text into HTML or code
	@for f in $(CONSOLE_JS); do node --input-type=module --check <"$$f" 2>/dev/null || { echo "$$f: not a valid ES module:" >&2; node --input-type=module --check <"$$f"; exit 1; }; done
	@if grep -nE 'innerHTML|outerHTML|insertAdjacentHTML|dangerouslySetInnerHTML|document\.write|\beval\(|new Function' $(CONSOLE_JS) | grep -vE '^[^:]+:[0-9]+:\s*(//|\*)'; then echo "the console renders fleet data as text only (docs/console.md#security)" >&2; exit 1; fi

proto-breaking: setup  ## buf breaking-change check of protos/ against the main branch
	cd protos && ../$(BUF) breaking --against '../.git#branch=main,subdir=protos'

clean:  ## remove the venv, node_modules, caches and build outputs
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist
