# The README's two commands: `make demo` and `make test`.
# Each creates or updates the local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch that lies on the project machines' disk; users
# with a GPU install their own build (pyproject.toml accepts a range).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# A second environment with the package versions released 3D Slicer ships
# (pydicom 2.4.4, numpy < 2): the Slicer-side tests run again in it.
SLICER_VENV ?= .venv-slicer
SLICER_PY := $(SLICER_VENV)/bin/python
SLICER_STAMP := $(SLICER_VENV)/.installed
SLICER_CONSTRAINTS := Testing/slicer-constraints.txt
SLICER_SIDE_TESTS := Testing/test_imageio.py Testing/test_rtstruct.py Testing/test_dicom_conformance.py \
	Testing/test_study.py Testing/test_slicer_lib.py Testing/test_slicer_logic.py
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo test clean

venv: $(STAMP)

# Debian packages only the tests need: Chromium for the browser review's
# end-to-end test (Playwright drives it; no browser is downloaded), and the
# DICOM tools that check what we write (dciodvfy from dicom3tools, dcmtk's
# dcmdump, plastimatch), and Orthanc, a real PACS the DICOM node's test
# starts on a loopback port (its service is not started by the package here). Needs root or sudo on Debian. `make demo` needs none.
TEST_TOOLS := chromium dciodvfy dcmdump plastimatch Orthanc
TEST_PACKAGES := chromium dicom3tools dcmtk plastimatch orthanc

.PHONY: test-tools
test-tools:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing (Debian: $(TEST_PACKAGES))"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(TEST_PACKAGES); fi

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "rt-utils==1.2.7"
	touch $(STAMP)

$(SLICER_STAMP): pyproject.toml Makefile $(SLICER_CONSTRAINTS)
	test -x $(SLICER_PY) || $(PYTHON) -m venv $(SLICER_VENV)
	$(SLICER_PY) -m pip install -q --upgrade pip
	$(SLICER_PY) -m pip install -q "$(TORCH_SPEC)" -c $(SLICER_CONSTRAINTS)
	$(SLICER_PY) -m pip install -q -e ".[slicer-test]" -c $(SLICER_CONSTRAINTS)
	$(SLICER_PY) -m pip install -q --no-deps "rt-utils==1.2.7"
	$(SLICER_PY) -c "import numpy, pydicom; assert numpy.__version__ < '2' and pydicom.__version__ == '2.4.4', (numpy.__version__, pydicom.__version__)"
	touch $(SLICER_STAMP)

demo: $(STAMP)
	$(VENV)/bin/focusnet demo --out demo-output

# Two pytest-xdist workers, a test file each at a time (module fixtures and
# temporary folders stay within one worker): 6.6 instead of 12.4 minutes on
# a 2-core AMD EPYC, as many tests wait on subprocesses or run single-threaded.
# Files start in Testing/conftest.py's order, the longest first (xdist's own
# reorder, by number of tests, left the long files with few tests to the end).
PYTEST := -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: test-tools $(STAMP) $(SLICER_STAMP)
	$(PY) $(PYTEST)
	@echo "Slicer-side tests again with Slicer's package versions (pydicom 2.4.4, numpy < 2):"
	$(SLICER_PY) $(PYTEST) -p no:cacheprovider $(SLICER_SIDE_TESTS)

clean:
	rm -rf $(VENV) $(SLICER_VENV) demo-output
