# Set-up and the two everyday commands. Every target creates the virtual environment first,
# so on a fresh machine `make demo` or `make test` is all it takes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/capdec-study demo

test: setup
	$(BIN)/python -m pytest

clean-demo:
	rm -rf capdec-demo
