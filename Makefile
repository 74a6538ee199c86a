# The README's two commands: `make demo` and `make test`.
# Each creates or updates the local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch that lies on the project machines' disk; users
# with a GPU install their own build (pyproject.toml accepts a range).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# A second environment with exactly the Python packages released 3D Slicer 5.8
# ships (Testing/slicer-constraints.txt: each pin with the Slicer SuperBuild
# file it comes from; pydicom 2.4.4, numpy 1.26.4), plus torch, what the
# module installs into Slicer (dependencies.REQUIREMENTS, read from
# dependencies.py) and test tooling only (pyproject's slicer-test extra): none
# of the project's own dependencies or the dev extra (matplotlib & co.), so a
# package Slicer lacks and REQUIREMENTS does not install fails here as in
# Slicer. The Slicer-side tests run again in it (Python 3.11, the machine's
# only interpreter; Slicer 5.8 runs 3.9). `make test-slicer512` runs them in
# the same build from Slicer 5.12's packages (Python 3.12 there; numpy 2.4,
# pydicom 3, highdicom shipped by Slicer): not part of `make test`, as it adds
# 2-3 minutes on 2 cores for versions the first run mostly covers already.
SLICER_VENV ?= .venv-slicer
SLICER_CONSTRAINTS ?= Testing/slicer-constraints.txt
SLICER512_VENV ?= .venv-slicer512
SLICER512_CONSTRAINTS ?= Testing/slicer-5.12-constraints.txt
SLICER_REQUIREMENTS_FROM := FocusNetSegment/FocusNetSegmentLib/dependencies.py
# Test tooling installed with --no-deps: slicer-core (the MRML stand-in; its
# only dependency, vtk==9.6.0, is pinned in the constraints, whose PyPI wheel
# asks for matplotlib) and rt-utils (asks for the GUI opencv-python; the
# extra's opencv-python-headless provides the same cv2).
SLICER_NO_DEPS_TOOLS := slicer-core==5.11.0.6 rt-utils==1.2.7
SLICER_SIDE_TESTS := Testing/test_imageio.py Testing/test_rtstruct.py Testing/test_dicom_conformance.py \
	Testing/test_study.py Testing/test_slicer_lib.py Testing/test_slicer_logic.py Testing/test_slicer_controller.py \
	Testing/test_terminology.py Testing/test_slicer_environment.py
# `focusnet study report` (its plots need matplotlib) is a command-line tool,
# not run in Slicer: its two tests stay out of the Slicer environments' runs.
SLICER_SIDE_DESELECT := --deselect Testing/test_study.py::test_report_on_a_synthetic_log \
	--deselect Testing/test_study.py::test_study_cli
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo test test-slicer512 clean

venv: $(STAMP)

# Debian packages only the tests need: Chromium for the browser review's
# end-to-end test (Playwright drives it; no browser is downloaded), and the
# DICOM tools that check what we write (dciodvfy from dicom3tools, dcmtk's
# dcmdump, plastimatch), and Orthanc, a real PACS the DICOM node's test
# starts on a loopback port (its service is not started by the package here). Needs root or sudo on Debian. `make demo` needs none.
TEST_TOOLS := chromium dciodvfy dcmdump plastimatch Orthanc gdcmconv
TEST_PACKAGES := chromium dicom3tools dcmtk plastimatch orthanc libgdcm-tools

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

# One recipe for both Slicer environments: $(1) the venv, $(2) its constraints;
# built afresh, so nothing an earlier recipe installed stays behind.
# Slicer's packages exactly (--no-deps: Slicer's own lists are closed), torch,
# REQUIREMENTS under the constraints, the project itself with --no-deps, then
# the tooling (--no-warn-conflicts: pip would list the project's own
# dependencies this environment leaves out on purpose;
# Testing/test_slicer_environment.py checks the result instead).
define slicer_venv
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --no-deps -r $(2)
	$(1)/bin/python -m pip install -q "$(TORCH_SPEC)" -c $(2)
	$(1)/bin/python -c "import runpy; print('\\n'.join(runpy.run_path('$(SLICER_REQUIREMENTS_FROM)')['REQUIREMENTS'].values()))" > $(1)/focusnet-requirements.txt
	$(1)/bin/python -m pip install -q -r $(1)/focusnet-requirements.txt -c $(2)
	$(1)/bin/python -m pip install -q --no-deps -e .
	$(1)/bin/python -c "import importlib.metadata as m; print('\\n'.join(r.split(';')[0] for r in m.requires('focusnet') if 'extra == \"slicer-test\"' in r))" > $(1)/test-tools.txt
	$(1)/bin/python -m pip install -q --no-warn-conflicts -r $(1)/test-tools.txt -c $(2)
	$(1)/bin/python -m pip install -q --no-deps $(SLICER_NO_DEPS_TOOLS)
	touch $(1)/.installed
endef

$(SLICER_VENV)/.installed: pyproject.toml Makefile $(SLICER_CONSTRAINTS) $(SLICER_REQUIREMENTS_FROM)
	$(call slicer_venv,$(SLICER_VENV),$(SLICER_CONSTRAINTS))

$(SLICER512_VENV)/.installed: pyproject.toml Makefile $(SLICER512_CONSTRAINTS) $(SLICER_REQUIREMENTS_FROM)
	$(call slicer_venv,$(SLICER512_VENV),$(SLICER512_CONSTRAINTS))

demo: $(STAMP)
	$(VENV)/bin/focusnet demo --out demo-output

# Two pytest-xdist workers, a test file each at a time (module fixtures and
# temporary folders stay within one worker): 6.6 instead of 12.4 minutes on
# a 2-core AMD EPYC, as many tests wait on subprocesses or run single-threaded.
# Files start in Testing/conftest.py's order, the longest first (xdist's own
# reorder, by number of tests, left the long files with few tests to the end).
# --max-worker-restart 0: a worker that dies (a native crash, a signal) ends
# the run at once naming the test it ran, instead of the replacement worker
# waiting forever (pytest-xdist's loadfile scheduler hangs after a restart:
# seen once here, 2026-12-07, in test_openvino_backend.py).
PYTEST := -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart 0

# Both runs happen even when the first fails; the summary names each.
test: test-tools $(STAMP) $(SLICER_VENV)/.installed
	@main=0; slicer=0; \
	$(PY) $(PYTEST) || main=$$?; \
	echo "Slicer-side tests again with released Slicer 5.8's Python packages ($(SLICER_CONSTRAINTS)):"; \
	FOCUSNET_SLICER_CONSTRAINTS=$(SLICER_CONSTRAINTS) $(SLICER_VENV)/bin/python $(PYTEST) -p no:cacheprovider \
	  $(SLICER_SIDE_DESELECT) $(SLICER_SIDE_TESTS) || slicer=$$?; \
	echo "make test: main run $$([ $$main = 0 ] && echo passed || echo "FAILED (exit $$main)"), Slicer 5.8 run $$([ $$slicer = 0 ] && echo passed || echo "FAILED (exit $$slicer)")"; \
	[ $$main = 0 ] && [ $$slicer = 0 ]

test-slicer512: test-tools $(SLICER512_VENV)/.installed
	@echo "Slicer-side tests with released Slicer 5.12's Python packages ($(SLICER512_CONSTRAINTS)):"
	FOCUSNET_SLICER_CONSTRAINTS=$(SLICER512_CONSTRAINTS) $(SLICER512_VENV)/bin/python $(PYTEST) -p no:cacheprovider $(SLICER_SIDE_DESELECT) $(SLICER_SIDE_TESTS)

clean:
	rm -rf $(VENV) $(SLICER_VENV) $(SLICER512_VENV) demo-output
