PYTHON ?= python3

.PHONY: install test lint bench

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
install:
	$(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check lorabake tests scripts

bench:
	$(PYTHON) scripts/bench.py
