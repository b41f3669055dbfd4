# The two set-up commands: `make test` and `make demo`. Each creates .venv
# on first use and installs the project with its test extra.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/doorstep demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict protocol

bench: $(STAMP)
	$(BIN)/python bench/handshake.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
