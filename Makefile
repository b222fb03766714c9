# attnlab: `make run` sets up .venv and runs the walkthrough on the book's example;
# `make test` sets up .venv, runs ruff and mypy (`make lint`), the whole suite (every README and docs example
# included: tests/test_docs_examples.py), builds the docs (`make docs`) and installs the wheel in a fresh venv
# (`make wheel-check`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.attnlab-installed

.PHONY: run test test-matrix lint bench chromium docs dist wheel-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel on local disk, so pip never pulls a CUDA build.
	$(PIP) install -qq torch==2.13.0
	$(PIP) install -qq -e '.[dev,models,docs]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/attnlab explain

# The browser tests drive Debian's chromium headless; install it when missing (needs root/apt).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  { echo "error: the browser tests need /usr/bin/chromium: install Debian's 'chromium' package" >&2; exit 1; }; }

# `make test` = lint (ruff, then mypy on the package) + the whole suite (docs examples included) + the kernel /
# thread matrix subset (`make test-matrix`, ~15 s) + the docs build + the wheel installed and run in a fresh venv.
test: lint chromium
	$(PY) -m pytest
	$(MAKE) --no-print-directory test-matrix docs wheel-check

# The kernel / thread matrix, CI-fast: a few numeric test files under PyTorch's portable kernels and AVX2 with
# one thread (the whole matrix, default/avx2/avx512 x 1/2/4 threads, is the same command with other values;
# tests/tolerances.py is why it passes on every CPU, tests/conftest.py reads ATTNLAB_TEST_THREADS).
MATRIX_TESTS := tests/test_tolerances.py tests/test_functional.py tests/test_backends.py tests/test_rope.py \
	tests/test_latent.py
test-matrix: $(STAMP)
	@for cap in default avx2; do \
	  echo "test-matrix: ATEN_CPU_CAPABILITY=$$cap ATTNLAB_TEST_THREADS=1"; \
	  ATEN_CPU_CAPABILITY=$$cap ATTNLAB_TEST_THREADS=1 $(PY) -m pytest -p no:cacheprovider $(MATRIX_TESTS) || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src/attnlab

# The documentation site (mkdocs + Material + mkdocstrings), offline: docs/hooks.py writes the tables of names
# from the code, and --strict turns every warning (a broken link, a missing docstring target) into an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site
	@echo "docs: built build/site/index.html"

# sdist and wheel into dist/, with the venv's setuptools (no download).
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist . >/dev/null
	@ls dist

# The wheel, installed alone into a fresh venv: its dependencies (torch, ...) are seen through a .pth line that
# puts .venv's site-packages on sys.path (a plain path, so .venv's editable attnlab is not), attnlab itself
# must come from the wheel, with its package data.
WHEEL_VENV := build/wheel-venv
wheel-check: dist
	rm -rf $(WHEEL_VENV)
	$(PY) -m venv --without-pip $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(WHEEL_VENV)/purelib
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$$(cat $(WHEEL_VENV)/purelib)/attnlab-deps.pth"
	$(PIP) --python $(WHEEL_VENV)/bin/python install -qq --no-deps --no-index dist/*.whl
	cd $(WHEEL_VENV) && bin/python -c "import attnlab, pathlib, sys; \
	  f = pathlib.Path(attnlab.__file__).resolve(); venv = pathlib.Path(sys.prefix).resolve(); \
	  assert venv in f.parents, f'attnlab imported from {f}, not from the wheel in {venv}'; \
	  from importlib.resources import files; \
	  missing = [n for n in ('report.js', 'report.css') if not files('attnlab.report').joinpath(n).is_file()]; \
	  assert not missing, f'package data missing from the wheel: {missing}'; \
	  print('wheel: attnlab', attnlab.__version__, 'from', f.parent)"
	cd $(WHEEL_VENV) && bin/attnlab --version && bin/attnlab explain --section simple > explain.txt && \
	  grep -q "Simplified self-attention" explain.txt && echo "wheel: attnlab explain --section simple ran"

bench: $(STAMP)
	$(VENV)/bin/attnlab bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build dist
