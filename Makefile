# lean: the two commands a fresh machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.ini
BROWSER_DRIVER := tests/browser/node_modules/.package-lock.json
AI_SDK := tests/aisdk/node_modules/.package-lock.json

.PHONY: run test check bench lint fmt clean

$(BIN)/lean: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

run: $(BIN)/lean
	$(BIN)/lean serve --config $(CONFIG)

test: $(BIN)/lean $(BROWSER_DRIVER) $(AI_SDK)
	$(BIN)/python -m pytest -q -n 2  # two workers: most tests wait on sockets and timers

# The browser tests' driver (playwright-core; it drives Debian's chromium, downloads none).
# Without npm, or offline, the browser tests skip and pytest says why.
$(BROWSER_DRIVER): tests/browser/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix tests/browser --no-audit --no-fund \
			|| echo "npm ci failed: the browser tests will skip"; \
	else echo "npm is missing: the browser tests will skip"; fi

# The AI SDK (`ai`, pinned) that tests/test_aisdk.py runs against lean's UI message stream.
$(AI_SDK): tests/aisdk/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix tests/aisdk --no-audit --no-fund \
			|| echo "npm ci failed: the AI SDK tests will skip"; \
	else echo "npm is missing: the AI SDK tests will skip"; fi

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
	rm -rf $(VENV) build *.egg-info tests/browser/node_modules tests/aisdk/node_modules
