# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The browser tests drive Debian's Chromium; Playwright must never download a browser of its own.
CHROMIUM ?= /usr/bin/chromium
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: setup browser prometheus docker-bases test-docker demo test lint test-slow test-scale bench bench-scale screenshots clean

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
	@echo "  explorer:      http://$(HOST):$(PORT)/   (pick r and c, see the tree, the cost map and the maps)"
	@echo "  OpenAPI docs:  http://$(HOST):$(PORT)/docs"
	@echo "  try:           curl -s -X POST http://$(HOST):$(PORT)/preference -H 'content-type: application/json' -d '{\"r\": [0.6, 0.3, 0.1], \"c\": 0.5}'"
	@echo "                 curl -s -X POST http://$(HOST):$(PORT)/predict -F image=@service/example.png -F r=0.6,0.3,0.1 -F c=0.5 -D - -o /dev/null"
	@echo "  (the core tour is still there: $(PY) examples/core_demo.py)"
	$(VENV)/bin/dymu serve $(MODEL_DIR) --host $(HOST) --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check .

# Debian's chromium for the browser tests (tests/test_explorer_browser.py), installed when missing.
# If it cannot be installed, those tests fail and say why: they are not skipped.
browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  echo "installing Debian's chromium for the browser tests (apt-get install chromium)"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  { $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	    echo "could not install chromium: the browser tests will fail and say why"; \
	fi

# Debian's prometheus and promtool for tests/test_prometheus.py (a real Prometheus scraping a real
# `dymu serve`, and the rules' unit tests), installed when missing; without them those tests fail.
prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  echo "installing Debian's prometheus for the Prometheus tests (apt-get install prometheus)"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  { $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || \
	    echo "could not install prometheus: the Prometheus tests will fail and say why"; \
	fi

test: lint browser prometheus
	$(PY) -m pytest -q -m "not slow and not scale and not docker"

# The base images of docker/Dockerfile and docker-compose.yml: pulled, or where Docker Hub cannot
# be reached, local stand-ins built from Debian packages (docker/bases/bases.sh); and this
# machine's pip configuration for the image build (docker/pip/, docker/bases/pip_context.py).
docker-bases:
	bash docker/bases/bases.sh
	$(PYTHON) docker/bases/pip_context.py

# `docker compose up` for real: build, start, wait for health, predict, ask Prometheus, take it
# down (docker/test-docker.sh; installs docker.io/docker-compose and starts dockerd if needed).
test-docker: setup
	bash docker/test-docker.sh $(PY)

# Ray Serve replicas and torchrun DDP (docs/scale.md): installs the ray extra first.
test-scale: setup
	$(PY) -m pip install --quiet -e ".[ray]"
	$(PY) -m pytest -q -m scale

# Tests marked slow (the tiny `dymu bench` run of tests/test_bench.py and three whole CLI runs
# of training and the tree map, ~3.5 min): kept out of `make test` so that it stays under 10
# minutes on 2 cores from a fresh clone; .ci/run calls both.
test-slow: setup
	$(PY) -m pytest -q -m slow

# The quick benchmark (< 2 min on 2 CPU cores); `dymu bench --out DIR` is the full suite.
bench: setup
	$(VENV)/bin/dymu bench --quick --out bench-results

# The README's screenshots of the explorer (docs/img/), taken with the shipped model.
screenshots: setup browser
	$(PY) examples/explorer_screenshots.py

bench-scale: setup
	$(PY) -m pip install --quiet -e ".[ray]"
	$(PY) benchmarks/scale_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis tmp/artifacts
