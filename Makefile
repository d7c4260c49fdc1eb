# Set-up on a fresh machine is part of every target: a virtualenv in .venv with
# torch pinned to 2.13.0 (on the team's machines a local CPU wheel; a bare
# `pip install torch` pulls gigabytes of CUDA packages).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job on the embedded default: train LeNet5 with SBP on digits, export, prune, measure
	$(VENV)/bin/onnxprune demo

test: $(STAMP)  ## the linter, then the default test suite (pytest exits 5 when no test ran: a failure)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-all: $(STAMP)  ## also the slow, benchmark-style tests
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) out .pytest_cache
