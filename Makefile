# The two commands: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

test: install
	$(BIN)/python -m pytest

demo: install
	@echo "make demo arrives with the embedded-default issue (#5); see README.md"

clean:
	rm -rf $(VENV) *.egg-info
