# tokiwa — the two README commands: `make demo` and `make test`.
# Each creates .venv if needed and installs the project into it (Python 3.11+ required).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo demo-forever test test-fast bench lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tokiwa needs Python 3.11+, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# the dashboard's browser tests (tests/browser) drive Debian's chromium headless
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing chromium and chromium-driver with apt-get (for tests/browser)"; \
	  SUDO=; if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver \
	  || { echo "error: could not install chromium and chromium-driver (needed by tests/browser)" >&2; exit 1; }; \
	fi
	@touch $(STAMP)

## make demo: a producer and two workers on an embedded redis-server; exits 0 in under a minute.
## DEMO_FOREVER=1 make demo (or make demo-forever) keeps it running until Ctrl+C.
demo: $(STAMP)
	$(BIN)/python -m examples.demo $(if $(DEMO_FOREVER),--forever,)

demo-forever: $(STAMP)
	$(BIN)/python -m examples.demo --forever

## make test: the whole suite (unit + integration on a real redis-server it starts itself).
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

## make bench: benchmarks/results/<time>.json and a printed table.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

lint: $(STAMP)
	$(BIN)/ruff check orchestrator workers tests examples benchmarks
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
