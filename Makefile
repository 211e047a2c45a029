# make demo: create .venv, install the package, run the whole pipeline on the built-in digits data.
# make test: create .venv, install the package with its dev extras, run the linter (ruff) and the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= artifacts/demo

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/ensemble-kd run --config pipelines/configs/digits.toml --out $(RUN) --overwrite
	@echo
	@echo "The command is $(BIN)/ensemble-kd (or run: source $(BIN)/activate), e.g. $(BIN)/ensemble-kd report $(RUN)"

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
