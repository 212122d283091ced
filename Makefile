# Two commands do all set-up on a fresh machine:
#   make demo   - install, start a private PostgreSQL, seed 2 years of orders, run the backfill DAG, print the result
#   make test   - install, start a private PostgreSQL, run the test suite on Airflow 3.3 (and `make test-af2` on 2.11)
# PostgreSQL: BACKFILL_TEST_PG_URL=postgresql://... uses that server; unset, scripts/pg.sh starts a private one
# (initdb into .pgdata/, its own port, stopped when the target ends). Quick loop: `make check` (unit tests, lint, types);
# quicker: `make unit` (no database, no Airflow run, under 30 s).
# VENV=/path (or VENV2=/path), on the command line or in the environment, uses that virtualenv as it is.
PYTHON ?= python3
VENV ?= .venv
VENV2 ?= .venv-af2
PYTEST_ARGS ?=
# make bench ROWS=100000: both tables at that size (default: 2,000,000 rows and a 1,500,000-row scattered table)
ROWS ?=
BENCH_ARGS ?=
PG := PYTHON=$(VENV)/bin/python bash scripts/pg.sh
PG2 := PYTHON=$(VENV2)/bin/python bash scripts/pg.sh
UNIT := not e2e and not browser and not faults and not slow
# tests that reach no PostgreSQL server (marker `db`, set in tests/conftest.py), run no Airflow (`slow` above) and
# take no more than a second or so of CPU (`heavy`: large plans, checked in `make check`)
FAST := $(UNIT) and not db and not heavy
# a closed port: in `make unit` a test that reaches PostgreSQL without being marked `db` fails instead of passing
NO_PG := postgresql://postgres@127.0.0.1:1/postgres

.PHONY: venv venv-af2 pg pg-stop browser docs-screenshots demo test test-af2 test-all check unit unit-af2 lint fmt wheel-check race bench bench-peers bench-smoke bench-source clean

$(VENV)/.installed: pyproject.toml requirements/airflow-3.3.txt
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 needed (pyproject requires-python); set PYTHON=python3.x") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/airflow-3.3.txt -e '.[test,lint]'
	touch $@

$(VENV2)/.installed: pyproject.toml requirements/airflow-2.11.txt
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 needed (pyproject requires-python); set PYTHON=python3.x") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV2)
	$(VENV2)/bin/pip install -q --upgrade pip
	$(VENV2)/bin/pip install -q -r requirements/airflow-2.11.txt -e '.[test]'
	touch $@

# a VENV/VENV2 you give (command line or environment) is used as it is: never installed into
ifeq ($(origin VENV),file)
venv: $(VENV)/.installed
else
venv:
	@test -x $(VENV)/bin/python || { echo "VENV=$(VENV) has no bin/python"; exit 1; }
endif
ifeq ($(origin VENV2),file)
venv-af2: $(VENV2)/.installed
else
venv-af2:
	@test -x $(VENV2)/bin/python || { echo "VENV2=$(VENV2) has no bin/python"; exit 1; }
endif

# start the private server and leave it running (prints its URL); `make pg-stop` stops it
pg: venv
	$(PG) start
pg-stop:
	$(PG) stop

browser:
	bash scripts/ensure_browser.sh

# docs/img/first-hour-*.png from tests/e2e/test_first_hour.py (Airflow 3.3 components, Chromium)
docs-screenshots: venv browser
	$(PG) run $(VENV)/bin/python scripts/docs_screenshots.py

demo: venv
	$(PG) run $(VENV)/bin/python scripts/demo.py

# the benchmark's Airflow rows (`bench` marker) run in `make bench-smoke`, not here: they start scheduler
# clusters for minutes and test the benchmark, not the provider (its tiny run without Airflow stays in)
test: venv browser
	$(PG) run $(VENV)/bin/pytest -m "not bench" $(PYTEST_ARGS)

# the secondary version runs every test that drives Airflow (marker `airflow`, tests/conftest.py: operators,
# triggers, DAG factory, dag.test, clusters, faults, UI); the stage tests below the Airflow surface (psycopg2 and
# PostgreSQL only, the same code on both versions) run once, in `make test`. TEST_AF2_MARK="not bench" runs all.
TEST_AF2_MARK ?= airflow and not browser and not bench
test-af2: venv-af2
	$(PG2) run $(VENV2)/bin/pytest -m "$(TEST_AF2_MARK)" $(PYTEST_ARGS)

bench-smoke: venv
	$(PG) run $(VENV)/bin/pytest -m bench tests/test_bench_smoke.py $(PYTEST_ARGS)

test-all: test test-af2

# quick loop (~3 min on 2 cores): lint, types, and the unit tests (no e2e, browser, fault or slow tests)
check: lint venv
	$(PG) run $(VENV)/bin/pytest -q -x -m "$(UNIT)" $(PYTEST_ARGS)

# the fast tier (under 30 s on 2 cores): no database server needed or started, no Airflow run
unit: venv
	BACKFILL_TEST_PG_URL=$(NO_PG) $(VENV)/bin/pytest -q -m "$(FAST)" $(PYTEST_ARGS)

unit-af2: venv-af2
	BACKFILL_TEST_PG_URL=$(NO_PG) $(VENV2)/bin/pytest -q -m "$(FAST)" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: venv
	$(VENV)/bin/ruff format .

# build the sdist and wheel (python -m build), twine check, the files they hold; install the wheel into a fresh
# temporary venv with the Airflow 3.3 pins; `airflow providers list` and `airflow plugins` must show it (~3 min)
wheel-check: venv
	PYTHON=$(VENV)/bin/python bash scripts/check_wheel.sh

# the backfill/live-ingest race test, many rounds (each round is bounded to 30 s)
race: venv
	RACE_ROUNDS=$${RACE_ROUNDS:-10} $(PG) run $(VENV)/bin/pytest tests/live/test_race.py -q $(PYTEST_ARGS)

# the peers of (9), Sling and dlt, as optional extras of the bench (never runtime dependencies)
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/pip install -q -e '.[bench]'
	touch $@

bench-peers: $(VENV)/.bench-installed

bench: venv bench-peers
	$(PG) run $(VENV)/bin/python -m benchmarks.run $(if $(ROWS),--rows $(ROWS) --scattered-rows $(ROWS)) $(BENCH_ARGS)

# pgbench on the source while a backfill runs under a real scheduler: separate servers (a private source
# cluster on its own port) and the shared-server case; throttle off and on. ROWS sizes the table.
bench-source: venv
	$(VENV)/bin/python -m benchmarks.source_impact $(if $(ROWS),--rows $(ROWS)) $(BENCH_ARGS)

clean: pg-stop
	rm -rf $(VENV) $(VENV2) .demo .pytest_cache .pgdata
