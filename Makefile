# The two commands: `make demo` and `make test` (`make lint` alone: ruff and mypy).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint demo install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

# The linter, the formatter's check and the type checker (config in pyproject.toml), then the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# The CPU demo needs only the core and the training extra (faster to set up than the dev tools).
demo: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[train]"
	$(BIN)/nvlm demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
