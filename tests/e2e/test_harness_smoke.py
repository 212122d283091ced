"""Self-test of the e2e harness (tests/e2e/cluster.py) with a throwaway DAG, on whichever Airflow runs it.

The orders DAG's scenarios exercise triggering, pools, backfills and clearing for real; this module checks
what they rely on: a mapped classic operator with its pool and labels, clearing one mapped instance, that a
dying component is reported at once, and that stop() ends every process (task processes included) mid-run.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import psycopg2
import pytest

from tests.e2e.cluster import ADMIN_URL, AirflowCluster, ClusterError

pytestmark = pytest.mark.e2e

DAG_ID = "e2e_smoke"


@pytest.fixture(scope="module")
def smoke_db(databases) -> str:
    url = databases.create("smoke")
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE smoke_log (run_id text, day text, try_number int, started timestamptz, ended timestamptz);"
            "CREATE TABLE smoke_fault (day text PRIMARY KEY);"
        )
    conn.close()
    return url


@pytest.fixture(scope="module")
def cluster(smoke_db):
    with AirflowCluster(
        Path(__file__).with_name("dags_smoke"), connections={"smoke_db": smoke_db}, pools={"smoke_pool": 2}
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


def test_mapped_classic_operator_and_clearing_one_instance(cluster, db):
    db.execute("INSERT INTO smoke_fault VALUES ('2024-05-02')")
    run = cluster.trigger(DAG_ID, {"start": "2024-05-01", "end": "2024-05-04"}, via="cli")
    assert cluster.wait_for_run(DAG_ID, run) == "failed"
    tis = cluster.task_instances(DAG_ID, run)
    assert {(t.task_id, t.label): t.state for t in tis} == {
        ("plan", "-1"): "success",
        ("touch", "2024-05-01"): "success",
        ("touch", "2024-05-02"): "failed",
        ("touch", "2024-05-03"): "success",
        ("done", "-1"): "upstream_failed",
    }
    assert {t.pool for t in tis if t.task_id == "touch"} == {"smoke_pool"}

    db.execute("DELETE FROM smoke_fault")
    cleared = cluster.clear_failed(DAG_ID, run, "touch", map_index=1)
    assert cleared == ([("done", -1), ("touch", 1)] if cluster.v3 else [("done", None), ("touch", None)])
    assert cluster.wait_for_run(DAG_ID, run) == "success"

    db.execute("SELECT day, try_number FROM smoke_log WHERE run_id = %s", (run,))
    assert Counter(db.fetchall()) == Counter({("2024-05-01", 1): 1, ("2024-05-02", 2): 1, ("2024-05-03", 1): 1})


def test_dead_component_is_reported_and_stop_ends_everything_mid_run(cluster):
    run = cluster.trigger(DAG_ID, {"start": "2024-06-01", "end": "2024-06-03", "sleep": 120})
    cluster.wait_until(
        "a chunk to be running",
        lambda: any(t.state == "running" for t in cluster.task_instances(DAG_ID, run, "touch")),
        timeout=120,
    )
    pids = cluster.pids()
    assert len(pids) > len(cluster.procs)  # the running task processes are among them

    os.kill(cluster.procs["triggerer"].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="triggerer exited"):
        cluster.wait_for_run(DAG_ID, run, timeout=120)
    assert time.monotonic() - t0 < 30  # reported at once, not after the wait's timeout

    home = cluster.home
    cluster.stop()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=5)
    assert alive == []
    assert not home.exists()
    conn = psycopg2.connect(ADMIN_URL)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (cluster.meta_db,))
        assert cur.fetchone()[0] == 0
    conn.close()
