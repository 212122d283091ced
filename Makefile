# Two commands do all set-up on a fresh machine:
#   make demo   - install, find/start PostgreSQL, seed 2 years of orders, run the backfill DAG, print the result
#   make test   - install, find/start PostgreSQL, run the test suite on Airflow 3.3 (and `make test-af2` on 2.11)
PYTHON ?= python3.11
VENV ?= .venv
VENV2 ?= .venv-af2
PYTEST_ARGS ?=
# make bench ROWS=100000: both tables at that size (default: 2,000,000 rows and a 1,500,000-row scattered table)
ROWS ?=
BENCH_ARGS ?=

.PHONY: venv venv-af2 pg demo test test-af2 test-all race bench bench-peers bench-source clean

$(VENV)/.installed: pyproject.toml requirements/airflow-3.3.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/airflow-3.3.txt -e '.[test]'
	touch $@

$(VENV2)/.installed: pyproject.toml requirements/airflow-2.11.txt
	$(PYTHON) -m venv $(VENV2)
	$(VENV2)/bin/pip install -q --upgrade pip
	$(VENV2)/bin/pip install -q -r requirements/airflow-2.11.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed
venv-af2: $(VENV2)/.installed

pg: venv
	PYTHON=$(VENV)/bin/python bash scripts/ensure_postgres.sh

browser:
	bash scripts/ensure_browser.sh

demo: venv pg
	$(VENV)/bin/python scripts/demo.py

test: venv pg browser
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-af2: venv-af2 pg
	$(VENV2)/bin/pytest -m "not browser" $(PYTEST_ARGS)

test-all: test test-af2

# the backfill/live-ingest race test, many rounds (each round is bounded to 30 s)
race: venv pg
	RACE_ROUNDS=$${RACE_ROUNDS:-10} $(VENV)/bin/pytest tests/test_race.py -q $(PYTEST_ARGS)

# the peers of (9), Sling and dlt, as optional extras of the bench (never runtime dependencies)
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/pip install -q -e '.[bench]'
	touch $@

bench-peers: $(VENV)/.bench-installed

bench: venv pg bench-peers
	$(VENV)/bin/python -m benchmarks.run $(if $(ROWS),--rows $(ROWS) --scattered-rows $(ROWS)) $(BENCH_ARGS)

# pgbench on the source while a backfill runs under a real scheduler: separate servers (a private source
# cluster on its own port) and the shared-server case; throttle off and on. ROWS sizes the table.
bench-source: venv pg
	$(VENV)/bin/python -m benchmarks.source_impact $(if $(ROWS),--rows $(ROWS)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VENV2) .demo .pytest_cache
