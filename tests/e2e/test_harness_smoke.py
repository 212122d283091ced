"""Proves the e2e harness (tests/e2e/cluster.py) on whichever Airflow runs the tests, with a throwaway DAG.

One cluster for the whole module; each test uses its own date range so runs never share rows.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import psycopg2
import pytest

from tests.e2e.cluster import AirflowCluster, max_overlap

pytestmark = pytest.mark.e2e

DAG_ID = "e2e_smoke"
POOL_SLOTS = 2


@pytest.fixture(scope="module")
def smoke_db(databases) -> str:
    url = databases.create("smoke")
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE smoke_log (run_id text, day text, try_number int, started timestamptz, ended timestamptz);"
            "CREATE TABLE smoke_fault (day text PRIMARY KEY);"
        )
    conn.close()
    return url


@pytest.fixture(scope="module")
def cluster(smoke_db):
    with AirflowCluster(
        Path(__file__).with_name("dags_smoke"), connections={"smoke_db": smoke_db}, pools={"smoke_pool": POOL_SLOTS}
    ) as c:
        c.wait_for_dag(DAG_ID)
        c.unpause(DAG_ID)
        yield c


@pytest.fixture()
def db(smoke_db):
    conn = psycopg2.connect(smoke_db)
    conn.autocommit = True
    yield conn.cursor()
    conn.close()


def logged_days(cur, run_ids) -> Counter:
    cur.execute("SELECT day FROM smoke_log WHERE run_id = ANY(%s)", (list(run_ids),))
    return Counter(day for (day,) in cur.fetchall())


def test_trigger_with_conf_via_rest_and_cli(cluster, db):
    rest = cluster.trigger(DAG_ID, {"start": "2024-03-01", "end": "2024-03-04"}, via="rest")
    cli = cluster.trigger(DAG_ID, {"start": "2024-03-10", "end": "2024-03-12"}, via="cli")
    assert cluster.wait_for_runs(DAG_ID, [rest, cli]) == {rest: "success", cli: "success"}

    assert logged_days(db, [rest]) == Counter({"2024-03-01": 1, "2024-03-02": 1, "2024-03-03": 1})
    assert logged_days(db, [cli]) == Counter({"2024-03-10": 1, "2024-03-11": 1})
    touch = cluster.task_instances(DAG_ID, rest, "touch")
    assert [(t.map_index, t.label, t.state) for t in touch] == [
        (0, "2024-03-01", "success"),
        (1, "2024-03-02", "success"),
        (2, "2024-03-03", "success"),
    ]
    assert {t.pool for t in touch} == {"smoke_pool"}


def test_bad_date_in_conf_is_refused(cluster):
    assert "date" in cluster.trigger_expect_rejected(DAG_ID, {"start": "2024-13-45", "end": "2024-03-04"}).lower()


def test_pool_caps_concurrent_mapped_instances(cluster, db):
    run = cluster.trigger(DAG_ID, {"start": "2024-04-01", "end": "2024-04-07"})
    assert cluster.wait_for_run(DAG_ID, run) == "success"

    touch = cluster.task_instances(DAG_ID, run, "touch")
    assert len(touch) == 6
    assert max_overlap((t.start_date, t.end_date) for t in touch) <= POOL_SLOTS
    # The same bound seen from the database the tasks touched.
    db.execute("SELECT started, ended FROM smoke_log WHERE run_id = %s", (run,))
    assert max_overlap(db.fetchall()) <= POOL_SLOTS


def test_clear_only_the_failed_mapped_instance(cluster, db):
    db.execute("INSERT INTO smoke_fault VALUES ('2024-05-02')")
    run = cluster.trigger(DAG_ID, {"start": "2024-05-01", "end": "2024-05-04"})
    assert cluster.wait_for_run(DAG_ID, run) == "failed"
    states = {(t.task_id, t.label): t.state for t in cluster.task_instances(DAG_ID, run)}
    assert states == {
        ("plan", "-1"): "success",
        ("touch", "2024-05-01"): "success",
        ("touch", "2024-05-02"): "failed",
        ("touch", "2024-05-03"): "success",
        ("done", "-1"): "upstream_failed",
    }

    db.execute("DELETE FROM smoke_fault")
    cleared = cluster.clear_failed(DAG_ID, run, "touch", map_index=1)
    expected = [("done", -1), ("touch", 1)] if cluster.v3 else [("done", None), ("touch", None)]
    assert cleared == expected
    assert cluster.wait_for_run(DAG_ID, run) == "success"

    assert logged_days(db, [run]) == Counter({"2024-05-01": 1, "2024-05-02": 1, "2024-05-03": 1})
    tries = {t.label: t.try_number for t in cluster.task_instances(DAG_ID, run, "touch")}
    assert tries["2024-05-01"] == tries["2024-05-03"] == 1  # not re-run
    assert tries["2024-05-02"] == 2


def test_backfill_runs_each_day_once(cluster, db):
    runs = cluster.backfill(DAG_ID, "2024-02-01", "2024-02-03")
    assert len(runs) == 3, runs
    assert set(cluster.wait_for_runs(DAG_ID, runs).values()) == {"success"}
    assert logged_days(db, runs) == Counter({"2024-02-01": 1, "2024-02-02": 1, "2024-02-03": 1})
