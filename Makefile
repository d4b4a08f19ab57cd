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
	$(PY) -m pip install --quiet -e ".[dev,training,serving,onnx]"
	touch $(STAMP)

# Serve the shipped model (Ctrl-C stops it); HOST/PORT/MODEL_DIR can be overridden.
HOST      ?= 127.0.0.1
PORT      ?= 8000
MODEL_DIR ?= model_store/scenes-small

demo: setup
	@echo "dymu demo: serving $(MODEL_DIR) on http://$(HOST):$(PORT)"
	@echo "  OpenAPI docs:  http://$(HOST):$(PORT)/docs"
	@echo "  try:           curl -s -X POST http://$(HOST):$(PORT)/preference -H 'content-type: application/json' -d '{\"r\": [0.6, 0.3, 0.1], \"c\": 0.5}'"
	@echo "                 curl -s -X POST http://$(HOST):$(PORT)/predict -F image=@service/example.png -F r=0.6,0.3,0.1 -F c=0.5 -D - -o /dev/null"
	@echo "  (the core tour is still there: $(PY) examples/core_demo.py)"
	$(VENV)/bin/dymu serve $(MODEL_DIR) --host $(HOST) --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

# The quick benchmark (< 2 min on 2 CPU cores); `dymu bench --out DIR` is the full suite.
bench: setup
	$(VENV)/bin/dymu bench --quick --out bench-results

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
