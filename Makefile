# Quickstart targets. Each one makes (or reuses) a virtual environment in $(VENV), installs what
# it needs into it, and runs. Override TORCH to pick another build, e.g. `make test TORCH=torch`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: demo test install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"

demo: install
	$(BIN)/base-plugin demo

test: install
	$(BIN)/python -m pytest
