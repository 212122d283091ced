"""The example ``orders`` backfill DAG on a real cluster, against throwaway source/destination databases.

Shared by test_airflow3_e2e.py and test_airflow2_e2e.py (one of them runs, depending on the venv):

* the source is seeded with ``demo.seed_orders``; the destination gets the same empty ``orders`` table;
* a temporary dags folder holds the repo's ``dags/backfill_dags.py`` and the example ``orders.yaml``
  (``retries`` lowered, so an injected fault fails the chunk at once instead of after backoff); a cluster's
  metadata database goes in its ``throttle.ignore_databases`` (:func:`name_metadata_database`);
* the destination ``orders`` carries an audit trigger (BEFORE INSERT, so it also fires for rows the upsert
  finds already present): every row a chunk commits leaves one audit row, a chunk loaded twice leaves two;
* faults are injected through the database: a trigger that raises for one day's rows.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import yaml
from psycopg2 import sql

from tests.seed import create_orders, seed_orders
from tests.e2e.cluster import AirflowCluster, CeleryExecutorSetup, LocalExecutorSetup

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "backfill_orders"
CHUNK_TASK = "load_chunk"
SEED_START = dt.date(2023, 1, 1)
SEED_DAYS = 70
SEED_ROWS = 7000  # 100 rows a day: small, the point is the orchestration
POOL = "backfill_source"
POOL_SLOTS = 2


@dataclass
class OrdersEnv:
    src_url: str
    dst_url: str


def _execute(url: str, statement, params=None) -> list[tuple]:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


AUDIT_SQL = """
CREATE TABLE e2e_audit (id bigint NOT NULL, created_at timestamptz NOT NULL);
CREATE FUNCTION e2e_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO e2e_audit VALUES (NEW.id, NEW.created_at);
    RETURN NEW;
END $$;
CREATE TRIGGER e2e_audit BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION e2e_audit();
"""


def seed(src_url: str, dst_url: str, *, rows: int = SEED_ROWS, days: int = SEED_DAYS) -> OrdersEnv:
    src = psycopg2.connect(src_url)
    dst = psycopg2.connect(dst_url)
    try:
        seed_orders(src, rows=rows, days=days, start=SEED_START)
        create_orders(dst)
    finally:
        src.close()
        dst.close()
    _execute(dst_url, AUDIT_SQL)
    return OrdersEnv(src_url, dst_url)


def write_dags_folder(folder: Path, **overrides) -> Path:
    """The repo's DAG file plus the example YAML (with ``overrides``) in ``folder``; returns the folder."""
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dags" / "backfill_dags.py", folder / "backfill_dags.py")
    spec = yaml.safe_load((REPO / "dags" / "configs" / "orders.yaml").read_text())
    spec.update({"retries": 0, **overrides})
    (folder / "configs" / "orders.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def name_metadata_database(dags_folder: Path, cluster: AirflowCluster) -> None:
    """``throttle.ignore_databases: [<the cluster's metadata database>]`` in the orders spec: it shares the
    source's server, as in the README's quick start, and this is that setup's fix. Without it, ten runs being
    scheduled slow Airflow's own transactions and the (default) latency budget holds the chunks (the CI
    failure of 2026-12-07). Call before the cluster starts."""
    path = dags_folder / "configs" / "orders.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["throttle"] = {**spec.get("throttle", {}), "ignore_databases": [cluster.meta_db]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def start_cluster(
    env: OrdersEnv,
    dags_folder: Path,
    *,
    executor: LocalExecutorSetup | CeleryExecutorSetup | None = None,
    pool_slots: int = POOL_SLOTS,
) -> AirflowCluster:
    """A started cluster (caller stops it) with the DAG parsed and unpaused."""
    cluster = AirflowCluster(
        dags_folder,
        executor=executor,
        connections={"backfill_source_pg": env.src_url, "backfill_dest_pg": env.dst_url},
        pools={POOL: pool_slots},
        env={"AIRFLOW_BACKFILL_STRICT": "1"},  # a broken config is an import error, reported by wait_for_dag
    )
    name_metadata_database(dags_folder, cluster)
    try:
        cluster.start()
        cluster.wait_for_dag(DAG_ID)
        cluster.unpause(DAG_ID)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ------------------------------------------------------------------------------------------ evidence
def _bounds(start: dt.date, end: dt.date) -> dict:
    return {
        "lo": dt.datetime.combine(start, dt.time(), dt.timezone.utc),
        "hi": dt.datetime.combine(end, dt.time(), dt.timezone.utc),
    }


def table_digest(url: str) -> tuple[int, str]:
    """(rows, md5 of every row in id order) of the whole ``orders`` table."""
    return _execute(url, "SELECT count(*), md5(coalesce(string_agg(o::text, '|' ORDER BY o.id), '')) FROM orders o")[0]


def range_digest(url: str, start: dt.date, end: dt.date) -> tuple[int, str]:
    """(rows, md5 of all rows in id order) of orders created in [start, end): equal digests, equal data."""
    return _execute(
        url,
        "SELECT count(*), md5(coalesce(string_agg(o::text, '|' ORDER BY o.id), '')) FROM orders o "
        "WHERE created_at >= %(lo)s AND created_at < %(hi)s",
        _bounds(start, end),
    )[0]


def source_rows_per_day(env: OrdersEnv, start: dt.date, end: dt.date) -> dict[dt.date, int]:
    rows = _execute(
        env.src_url,
        "SELECT (created_at AT TIME ZONE 'UTC')::date, count(*) FROM orders "
        "WHERE created_at >= %(lo)s AND created_at < %(hi)s GROUP BY 1",
        _bounds(start, end),
    )
    return dict(rows)


def arrivals_per_day(env: OrdersEnv, start: dt.date, end: dt.date) -> dict[dt.date, tuple[int, int]]:
    """Per day: (rows committed into the destination, distinct ids). Equal numbers = each row arrived once."""
    rows = _execute(
        env.dst_url,
        "SELECT (created_at AT TIME ZONE 'UTC')::date, count(*), count(DISTINCT id) FROM e2e_audit "
        "WHERE created_at >= %(lo)s AND created_at < %(hi)s GROUP BY 1",
        _bounds(start, end),
    )
    return {day: (n, distinct) for day, n, distinct in rows}


def days(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range((end - start).days)]


# ------------------------------------------------------------------------------------------ faults
def inject_fault(env: OrdersEnv, day: dt.date) -> None:
    """Make every destination insert of ``day``'s rows fail (the chunk's transaction rolls back)."""
    _execute(
        env.dst_url,
        sql.SQL(
            """CREATE FUNCTION e2e_fault() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   IF (NEW.created_at AT TIME ZONE 'UTC')::date = {day} THEN
                       RAISE EXCEPTION 'e2e injected fault for %', NEW.created_at::date;
                   END IF;
                   RETURN NEW;
               END $$;
               CREATE TRIGGER e2e_fault BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION e2e_fault();"""
        ).format(day=sql.Literal(day)),
    )


def slow_down(env: OrdersEnv, seconds: float) -> None:
    """Make every chunk's upsert into the destination take at least ``seconds`` (one sleep per statement).

    Keeps tiny chunks running long enough to overlap, so a test can see a concurrency cap being reached.
    """
    _execute(
        env.dst_url,
        sql.SQL(
            """CREATE FUNCTION e2e_slow() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   PERFORM pg_sleep({seconds});
                   RETURN NULL;
               END $$;
               CREATE TRIGGER e2e_slow BEFORE INSERT ON orders FOR EACH STATEMENT EXECUTE FUNCTION e2e_slow();"""
        ).format(seconds=sql.Literal(seconds)),
    )


def remove_fault(env: OrdersEnv) -> None:
    _execute(env.dst_url, "DROP TRIGGER IF EXISTS e2e_fault ON orders; DROP FUNCTION IF EXISTS e2e_fault()")
