# One entry point. Every target works from a fresh clone: the virtual environment lives at .venv.
#   make install   the package, its dev extras and .venv/bin/strokes
#   make test      install, make sure redis-server and chromium exist, run the whole suite
#   make lint      ruff
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the CPU build of torch (on local disk here); a CUDA machine gets the normal build.
TORCH ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo 'torch>=2.5,<3'; else echo 'torch==2.13.0'; fi)

.PHONY: install test lint redis-server chromium clean demo

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet '$(TORCH)'
	$(PIP) install --quiet -e clients/python  # the Python client, its own distribution (strokes needs it)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found: installing it"; \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq redis-server) || sudo apt-get install -y -qq redis-server; \
	  elif command -v brew >/dev/null 2>&1; then brew install redis; \
	  else echo "please install redis-server" >&2; exit 1; fi; }

# The studio's browser tests drive Debian's chromium (never a downloaded one) with Playwright.
# Where it cannot be installed the suite still runs, and those tests skip with the reason shown.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "chromium not found: installing it for the studio's browser tests"; \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    || sudo apt-get install -y -qq chromium \
	    || echo "WARNING: chromium could not be installed: the studio's browser tests will be SKIPPED" >&2; \
	  else echo "WARNING: no apt-get: install chromium (or set STROKES_CHROMIUM) or the studio's browser tests are SKIPPED" >&2; fi; }

test: install redis-server chromium
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# One generation end to end: a tiny random checkpoint unless STROKES_CHECKPOINT is set, `strokes serve`
# (API + worker + a private redis-server), the events as they stream, images and trajectory in ./demo-out.
demo: install redis-server
	$(PY) -m strokes.service.cli demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
