# Two commands on a fresh machine (Python 3.11 + make): `make demo` and `make test`.
# `make test` first installs the system packages the tests need (`make test-deps`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ROOT ?= demo-data
# Only `make ui` looks at the demo's instance; tests and the demo set their own.
ui: export DAGSTER_HOME := $(abspath $(DEMO_ROOT))/dagster_home
ui: export CCAT_DT_CONFIG := $(abspath $(DEMO_ROOT))/ccat-dt.yaml

.PHONY: demo test test-fast test-deps bench ui lint clean

# compileall: our modules' bytecode, once; an editable install compiles none, and where
# PYTHONDONTWRITEBYTECODE is set every `ccat-dt` command would compile them all again.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m compileall -q ccat_dt ccat_assets sensors resources
	touch $@

demo: $(BIN)/.installed  ## simulate an observing night and drive it through the whole lifecycle
	$(BIN)/ccat-dt demo --root $(DEMO_ROOT)

test: $(BIN)/.installed test-deps  ## the whole test suite, as CI runs it (three workers on two cores: a quarter of the CPU sat idle with two; Celery suites never at once)
	$(BIN)/pytest -q -n 3 --dist loadgroup --durations=15

test-fast: $(BIN)/.installed test-deps  ## everything but the slow integration tests, one worker per core
	$(BIN)/pytest -q -m "not slow" -n auto

test-deps:  ## system packages the tests need (sshd, rsync, xxhash, VictoriaMetrics, Chromium); idempotent
	scripts/setup-test-host

bench: $(BIN)/.installed  ## benchmarks against xxhsum, tar, cp, rsync; writes docs/benchmarks.md
	$(BIN)/python -m bench

# The daemon and the webserver each start their own code server, as `dagster-daemon run` and
# `dagster-webserver` do in production: the daemon starts its own again if it dies (within a
# minute). With `dagster dev`'s default, one code server behind a proxy serves both, and
# once killed it stayed dead: every sensor tick and run launch failed until someone
# reloaded the code location (tests/faults/test_daemon_killed.py).
UI_COMMAND = $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000 --use-legacy-code-server-behavior

ui: $(BIN)/.installed  ## Dagster UI on the demo's instance: lineage, partitions, checks
	@test -f "$$CCAT_DT_CONFIG" || { echo "run 'make demo' first"; exit 1; }
	$(UI_COMMAND)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy ccat_dt ccat_assets sensors resources bench tests

clean:
	rm -rf $(VENV) $(DEMO_ROOT)
