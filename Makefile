# The two commands that work on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv demo test lint typecheck pytest bench soak clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("forwarder needs Python 3.11+") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/forwarder demo

lint: venv
	$(BIN)/ruff check forwarder tests
	$(BIN)/ruff format --check forwarder tests

typecheck: venv
	$(BIN)/mypy --strict

pytest: venv
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

bench: venv
	$(BIN)/python tests/benchmarks/bench_intake.py --out bench-intake.json

# Two soaks: SIGTERM/restart under load, then 20% remote faults in both queue modes.
soak: venv
	$(BIN)/python tests/benchmarks/soak_restarts.py --seconds 30
	$(BIN)/python tests/benchmarks/soak_faults.py --seconds 60 --clients 16
