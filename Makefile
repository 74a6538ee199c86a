# The README's two commands: `make demo` and `make test`.
# Each creates or updates the local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch that lies on the project machines' disk; users
# with a GPU install their own build (pyproject.toml accepts a range).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# Debian's Chromium for the browser review's end-to-end test (Playwright
	@# drives it; no browser is downloaded). Needs root or sudo on Debian.
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "rt-utils==1.2.7"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/focusnet demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output
