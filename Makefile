# lean: the two commands a fresh machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.ini

.PHONY: run test check bench lint fmt clean

$(BIN)/lean: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

run: $(BIN)/lean
	$(BIN)/lean serve --config $(CONFIG)

test: $(BIN)/lean
	$(BIN)/python -m pytest -q

check: $(BIN)/lean
	$(BIN)/ruff check lean tests bench
	$(BIN)/ruff format --check lean tests bench
	$(BIN)/mypy

bench: $(BIN)/lean
	$(BIN)/python -m bench

fmt: $(BIN)/lean
	$(BIN)/ruff format lean tests bench
	$(BIN)/ruff check --fix lean tests bench

clean:
	rm -rf $(VENV) build *.egg-info
