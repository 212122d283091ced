"""``python -m airflow_backfill_provider status`` on a real dag.test() run with one failed day (3.3 and 2.11)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys

import psycopg2.extensions
import pytest

from tests.seed import create_orders, seed_orders
from tests.conftest import REPO

FAULT = """
CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.created_at AT TIME ZONE 'UTC')::date IN (DATE '2023-01-03', DATE '2023-01-04') THEN
        RAISE EXCEPTION 'injected';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fault BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION fault();
"""


@pytest.fixture()
def failed_run(airflow_db, src_url, dst_url, pg, monkeypatch):
    seed_orders(pg(src_url), rows=600, days=6, start=dt.date(2023, 1, 1))
    create_orders(pg(dst_url))
    pg(dst_url).cursor().execute(FAULT)
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_SOURCE_PG", src_url)
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_DEST_PG", dst_url)
    from airflow_backfill_provider.loader import load_backfill_dags

    dag = load_backfill_dags(REPO / "dags" / "configs", strict=True).dags["backfill_orders"]
    for task in dag.tasks:  # fail the faulty chunk at once instead of after retries
        task.retries = 0
        if hasattr(task, "partial_kwargs"):
            task.partial_kwargs["retries"] = 0
    run = dag.test(run_conf={"start": "2023-01-01", "end": "2023-01-06"})
    assert str(getattr(run.state, "value", run.state)) == "failed"
    return run


def status(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it: its own process, the same environment (metadata DB, connections).

    The dags folder is the repo's: 2.11's dag.test() does not serialize the DAG, so there the command
    parses the DAG file to find the spec, as the ``airflow`` CLI would.
    """
    return subprocess.run(
        [sys.executable, "-m", "airflow_backfill_provider", "status", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags")},
    )


def test_status_names_the_failed_day_and_counts_rows(failed_run):
    out = status("backfill_orders", "--config", str(REPO / "dags" / "configs"))
    assert out.returncode == 1, out.stderr  # 1: some chunk failed
    text = out.stdout
    assert f"run {failed_run.run_id}" in text, out.stderr[-3000:]
    assert "chunks: 3/5 done (60%)" in text and "failed 2" in text and "loaded 3" in text
    assert "failed chunks: 2023-01-03, 2023-01-04" in text
    # read vs written (a first load: every row read was inserted); the rate is over the chunks' load window
    assert "rows: 300 read by this run, 300 written (300 inserted, 0 updated, 0 unchanged)" in text
    assert re.search(r"rate [\d,]+ rows/s read over [\d.]+ s of loading", text), text
    # why the chunk failed: the first line of its error, grouped with its count (recorded by the chunk itself)
    assert "why they failed (first line of each error, identical ones grouped):" in text
    # the same cause on two chunks: one line, counted (the chunk id the message starts with is not part of it)
    assert "\n  2 x permanent error (SQLSTATE P0001): injected  [2023-01-03, 2023-01-04]\n" in text, text
    assert "ETA: unknown (2 failed chunk(s) to clear)" in text
    assert "validation: not run yet" in text
    assert "waits: 0.0 s for the source's load, 0.0 s for pacing (0 loaded chunk(s) waited)" in text

    out = status("backfill_orders", "--run-id", failed_run.run_id, "--json", "--config", str(REPO / "dags" / "configs"))
    as_json = json.loads(out.stdout.strip().splitlines()[-1])  # 2.11 logs connection lookups to stdout
    states = {row[0]: row[2] for row in as_json["chunks"]["rows"]}
    assert states == {"2023-01-01": "loaded", "2023-01-02": "loaded", "2023-01-03": "failed",
                      "2023-01-04": "failed", "2023-01-05": "loaded"}  # fmt: skip
    cols = as_json["chunks"]["columns"]
    waits = {row[0]: (row[cols.index("waited_load_s")], row[cols.index("waited_pacing_s")])
             for row in as_json["chunks"]["rows"]}  # fmt: skip
    assert waits["2023-01-01"] == (0.0, 0.0) and waits["2023-01-03"] == (None, None)  # measured by the chunk
    (failure,) = as_json["failures"]
    assert failure == {"error": "permanent error (SQLSTATE P0001): injected", "count": 2,
                       "chunks": ["2023-01-03", "2023-01-04"]}  # fmt: skip
    errors = {row[0]: row[cols.index("error")] for row in as_json["chunks"]["rows"]}
    assert errors["2023-01-03"] == failure["error"] and errors["2023-01-01"] is None


def test_status_finds_the_spec_in_the_serialized_dag(failed_run):
    out = status("backfill_orders")
    assert out.returncode == 1, out.stderr
    assert "failed chunks: 2023-01-03" in out.stdout


def test_status_refuses_unknown_dag_and_run_with_the_fix(failed_run):
    out = status("no_such_dag")
    assert out.returncode == 2 and "'no_such_dag' is not in Airflow's metadata database" in out.stderr
    assert "--config" in out.stderr
    out = status("backfill_orders", "--run-id", "nope", "--config", str(REPO / "dags" / "configs"))
    assert out.returncode == 2 and "has no run 'nope'" in out.stderr


def test_status_finds_a_connection_stored_in_the_metadata_db(airflow_db, src_url, dst_url, pg, tmp_path):
    """A connection made with `airflow connections add` (metadata DB, no AIRFLOW_CONN_* variable) is found.

    Airflow 3's hook lookup outside a task sees only AIRFLOW_CONN_* variables and external secrets backends:
    `status` said the destination connection "does not exist" while `airflow connections get` showed it."""
    import uuid

    seed_orders(pg(src_url), rows=200, days=2, start=dt.date(2023, 1, 1))
    create_orders(pg(dst_url))
    conn_id = f"status_dest_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    # fields, not --conn-uri: 2.11's CLI fails masking a URI without a password (its _build_metrics)
    dsn = psycopg2.extensions.parse_dsn(dst_url)
    fields = ["--conn-type", "postgres", "--conn-host", dsn["host"], "--conn-port", str(dsn.get("port", 5432)),
              "--conn-login", dsn["user"], "--conn-schema", dsn["dbname"]]  # fmt: skip
    added = subprocess.run([airflow, "connections", "add", conn_id, *fields], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert added.returncode == 0, added.stderr[-2000:]
    spec = tmp_path / "metadb_conn.yaml"
    spec.write_text(
        f"name: metadb_conn\nsource_conn_id: {src_url}\ndestination_conn_id: {conn_id}\nsource_table: orders\n"
        "destination_table: public.orders\ntime_column: created_at\nkey_columns: [id]\nversion_column: updated_at\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "airflow_backfill_provider", "status", "backfill_metadb_conn", "--config", str(spec)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backfill_metadb_conn  run -  (no run)" in out.stdout and "chunks: 0/0 done" in out.stdout

    subprocess.run([airflow, "connections", "delete", conn_id], env=env, capture_output=True, timeout=120, check=True)
    gone = subprocess.run(
        [sys.executable, "-m", "airflow_backfill_provider", "status", "backfill_metadb_conn", "--config", str(spec)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip
    assert gone.returncode == 2 and f"Airflow connection {conn_id!r} does not exist" in gone.stderr, gone.stderr
    assert f"airflow connections add {conn_id}" in gone.stderr


def test_status_names_a_missing_pool_with_the_command_to_create_it(airflow_db, src_url, dst_url, pg, tmp_path):
    """Chunks in a pool that does not exist stay 'scheduled' forever and Airflow says so only in its scheduler
    log; on Airflow 3 the plan task cannot read pools. `status` (and the page) can: the pool and the fix."""
    import uuid

    create_orders(pg(dst_url))
    pool = f"status_pool_{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "pooled.yaml"
    spec.write_text(
        f"name: pooled\nsource_conn_id: {src_url}\ndestination_conn_id: {dst_url}\nsource_table: orders\n"
        f"destination_table: public.orders\ntime_column: created_at\nkey_columns: [id]\npool: {pool}\n"
    )
    out = status("backfill_pooled", "--config", str(spec))
    assert out.returncode == 0, out.stderr[-3000:]
    fix = f'airflow pools set {pool} 4 "source slots for backfills" --include-deferred'
    assert f"PROBLEM: The Airflow pool {pool!r} (spec key 'pool') does not exist" in out.stdout, out.stdout
    assert fix in out.stdout

    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    subprocess.run([airflow, "pools", "set", pool, "4", "source slots for backfills"], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    out = status("backfill_pooled", "--config", str(spec))
    assert out.returncode == 0 and "PROBLEM" not in out.stdout, out.stdout
