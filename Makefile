# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint test-slow bench clean

setup: $(STAMP)

# torch==2.13.0 first: on these machines it is a CPU wheel on local disk; the range in
# pyproject.toml (torch>=2.11) is then satisfied and pip installs no other torch build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet "torch>=2.11"
	$(PY) -m pip install --quiet -e ".[dev,training]"
	touch $(STAMP)

demo: setup
	$(PY) examples/core_demo.py

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/materialize.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
