# The two commands that work on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv demo test test-fast docs settings-docs lint typecheck pytest test-tools bench bench-quick wrk soak clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("forwarder needs Python 3.11+") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The speed extra (uvloop) too: mypy checks the typed import, and the e2e tests run the
# daemon on uvloop while the in-process ones run on asyncio's loop. The docs extra (mkdocs):
# `make test` builds the docs site. The fleet extra (redis-py): the fleet tests.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,speed,docs,fleet]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/forwarder demo

lint: venv
	$(BIN)/ruff check forwarder tests
	$(BIN)/ruff format --check forwarder tests

typecheck: venv
	$(BIN)/mypy --strict

# The unit and integration tests on two workers (they mostly wait on sockets and subprocesses,
# so two halve their time even on 2 cores), then the e2e tests one at a time (they time daemons
# and rate windows, and must not share the CPU with each other).
pytest: venv test-tools
	$(BIN)/pytest -m "not e2e" -n 2
	$(BIN)/pytest -m e2e

# promtool (Debian's prometheus package) checks and unit-tests contrib/prometheus's alert rules;
# redis-server (Debian's redis-server) runs under the fleet tests. Installed best effort where
# apt-get runs as root; without them those tests fail saying how to get them.
test-tools:
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& { apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1 \
		     || { apt-get update -qq >/dev/null 2>&1 \
		          && apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1; }; }; } \
		|| echo "make test: redis-server is not installed (Debian/Ubuntu: sudo apt-get install redis-server);" \
		        "the fleet tests will fail saying so"
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& { apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
		     || { apt-get update -qq >/dev/null 2>&1 \
		          && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }; }; } \
		|| echo "make test: promtool is not installed (Debian/Ubuntu: sudo apt-get install prometheus);" \
		        "the alert-rule tests will say so"

# The docs site (mkdocs.yml, docs/) into site/, strict: a broken link, a missing page or a page
# left out of the nav fails the build. Part of `make test`, so CI fails on a broken link. (Not
# --quiet: it hides the warnings that strict mode counts, and the build then passes.)
docs: venv
	$(BIN)/mkdocs build --strict

# config/forwarder.toml and the key table of docs/reference/configuration.md, rewritten from the
# settings declared in forwarder/config/schema.py (tests/unit/test_docs_config.py fails while stale).
settings-docs: venv
	$(BIN)/python -m forwarder.config.generate --write

test: lint typecheck docs pytest

# Unit and integration tests only (tests/unit, tests/integration: no `forwarder run` subprocess),
# one worker per core: under a minute on 2 cores. `make test` runs these and the e2e tests (one
# at a time: they time daemons), and lints and type-checks.
test-fast: venv test-tools
	$(BIN)/pytest -m "not e2e" -n auto

clean:
	rm -rf $(VENV) site .mypy_cache .ruff_cache .pytest_cache *.egg-info

# The benchmark suite (docs/performance.md): one table, and every round's numbers in
# bench-results.json. `make bench-quick` for a short run; more options with BENCH_ARGS, e.g.
# `make bench BENCH_ARGS="--only delivery --profile"` (bench_suite.py --help lists them).
BENCH_ARGS ?=

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,speed,bench]'
	touch $@

# wrk (C, one thread) is the cheapest load generator; without it the suite drives the load from
# Python. Installed best effort where apt-get runs as root.
wrk:
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& { apt-get install -y -qq wrk >/dev/null 2>&1 \
		     || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1; }; }; } \
		|| echo "make bench: wrk is not installed (Debian/Ubuntu: sudo apt-get install wrk);" \
		        "the suite uses its Python load generator instead"

bench: $(VENV)/.bench-installed wrk
	$(BIN)/python tests/benchmarks/bench_suite.py --out bench-results.json $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS="--quick $(BENCH_ARGS)"

# Two soaks: SIGTERM/restart under load, then 20% remote faults in both queue modes.
soak: venv
	$(BIN)/python tests/benchmarks/soak_restarts.py --seconds 30
	$(BIN)/python tests/benchmarks/soak_faults.py --seconds 60 --clients 16
