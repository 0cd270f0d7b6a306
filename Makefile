# preannot: `make demo` runs the whole job on embedded defaults, `make test` runs the tests.
# Both set themselves up on a fresh machine: a virtualenv in .venv (CPU torch first, so no CUDA
# build is pulled), the project, and the Debian packages the tests use when they are missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch with torchvision (MONAI's detection networks need it); pip takes this pair from local disk here.
# Installed first and pinned exactly, so resolving the project never pulls another torch build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-all bench soak lint typecheck apt-deps clean help

help:
	@echo "make demo   - start the node, push sample_dicom, receive SEG + SR back, show them"
	@echo "make test   - run the test suite (sets up .venv and Debian packages when missing)"
	@echo "make test-slow - the slow tests (real-data corpus, viewer round trips; CI runs them too)"
	@echo "make lint / typecheck / bench / soak / clean"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages used by the tests: dcmtk (storescu/storescp as outside peers), dicom3tools (dciodvfy),
# chromium (dashboard and OHIF screenshots), orthanc + its DICOMweb plugin (a real PACS).
apt-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then \
	    echo "warning: missing Debian packages:$$missing (no root/sudo); the tests that need them will skip"; \
	  else \
	    echo "installing Debian packages:$$missing"; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	fi

demo: $(STAMP)
	$(BIN)/python -m node.devtools.demo

test: $(STAMP) apt-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the slow tests CI also runs (the real-data corpus, the viewer round trips): tens of minutes on 2 cores
test-slow: $(STAMP) apt-deps
	$(BIN)/python -m pytest -m "slow and not gpu and not soak" $(PYTEST_ARGS)

test-all: $(STAMP) apt-deps
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check node tests benchmarks models

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP) apt-deps
	$(BIN)/python -m benchmarks.run

soak: $(STAMP) apt-deps
	PREANNOT_SOAK=1 PREANNOT_FAULT_REPORT=$(CURDIR)/soak-report.jsonl $(BIN)/python -m pytest -m "not gpu" \
	  tests/test_faults.py tests/test_crash.py tests/test_pdu_fuzz.py \
	  tests/test_security.py::test_a_huge_announced_pdu_is_never_buffered \
	  tests/test_security.py::test_broken_dimse_from_a_known_caller_never_locks_it_out $(PYTEST_ARGS)
	@echo "figures: soak-report.jsonl"

clean:
	rm -rf demo-output .pytest_cache .mypy_cache .ruff_cache benchmarks/work
