# attnlab: `make run` sets up .venv and runs the walkthrough on the book's example;
# `make test` sets up .venv, runs ruff and mypy (`make lint`), then the whole suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.attnlab-installed

.PHONY: run test lint bench chromium clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel on local disk, so pip never pulls a CUDA build.
	$(PIP) install -qq torch==2.13.0
	$(PIP) install -qq -e '.[dev,models]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/attnlab explain

# The browser tests drive Debian's chromium headless; install it when missing (needs root/apt).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  { echo "error: the browser tests need /usr/bin/chromium: install Debian's 'chromium' package" >&2; exit 1; }; }

# `make test` = lint (ruff, then mypy on the package) + the whole suite.
test: lint chromium
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src/attnlab

bench: $(STAMP)
	$(VENV)/bin/attnlab bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
