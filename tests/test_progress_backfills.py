"""Two backfills into one table: the progress figures are each backfill's own (issue 16), and the per-chunk
waits the page shows come from the ledger (including a ledger from before the wait columns).

Real loads on PostgreSQL: two source tables (two backfills by identity.py) into one destination table,
run by two DAGs whose runs have the same run id (``airflow backfill create`` names runs by date alone).
"""

from __future__ import annotations

import datetime as dt

from airflow_backfill_provider import ledger
from airflow_backfill_provider.chunks import plan_chunks
from airflow_backfill_provider.planning import build_plan
from airflow_backfill_provider.progress import (
    RunInfo,
    TaskState,
    build_progress,
    ledger_rate,
    read_ledger,
    run_totals,
)
from airflow_backfill_provider.spec import TableName, load_spec
from airflow_backfill_provider.transfer import transfer_chunk
from tests.conftest import fetch_all
from tests.seed import create_orders, seed_orders

DAYS = plan_chunks("2024-01-01", "2024-01-04", "day", "UTC")
RUN_ID = "backfill__2024-01-01T00:00:00+00:00"  # both DAGs' runs: ids are unique per DAG only


def spec_for(src, dst, name, table):
    return load_spec(
        {"name": name, "source_conn_id": src, "destination_conn_id": dst, "source_table": table,
         "destination_table": "public.orders", "time_column": "created_at", "key_columns": ["id"],
         "version_column": "updated_at", "timezone": "UTC", "granularity": "day"}
    )  # fmt: skip


def rows_per_day(src_url, table):
    got = fetch_all(src_url, f"SELECT created_at::date::text, count(*) FROM {table} GROUP BY 1 ORDER BY 1")
    return dict(got)


def test_two_backfills_into_one_table_each_show_their_own_progress(src_url, dst_url, pg):
    src = pg(src_url)
    seed_orders(src, rows=300, days=3, start=dt.date(2024, 1, 1), table="orders_us", first_id=1)
    seed_orders(src, rows=90, days=3, start=dt.date(2024, 1, 1), table="orders_eu", first_id=10_001)
    create_orders(pg(dst_url))
    us = spec_for(src_url, dst_url, "us", "orders_us")
    eu = spec_for(src_url, dst_url, "eu", "orders_eu")
    keys = {}
    for spec in (us, eu):  # the plan records the backfill's key (what the page selects the ledger by)
        plan = build_plan(spec, "2024-01-01", "2024-01-04", dst_conn=pg(dst_url), src_conn=pg(src_url))
        keys[spec.name] = plan.summary()["backfill_key"]
    assert keys["us"] and keys["eu"] and keys["us"] != keys["eu"]

    for c in DAYS:  # us: every day, its second one after waiting 4 s for the source's load
        transfer_chunk(us, c, dag_id="backfill_us", run_id=RUN_ID, waited_load_s=4.0 if c is DAYS[1] else 0.0)
    for c in DAYS[:2]:  # eu: two of three days so far; the first waited 1.5 s for its pacing turn
        transfer_chunk(eu, c, dag_id="backfill_eu", run_id=RUN_ID, waited_pacing_s=1.5 if c is DAYS[0] else 0.0)
    # the same plan again: each backfill skips its own loaded days only
    plan = build_plan(eu, "2024-01-01", "2024-01-04", dst_conn=pg(dst_url), src_conn=pg(src_url))
    assert ([c.chunk_id for c in plan.chunks], plan.backfill_key) == ([DAYS[2].chunk_id], keys["eu"])

    eu_days = rows_per_day(src_url, "orders_eu")
    conn = pg(dst_url)
    rows = read_ledger(conn, eu, backfill_key=keys["eu"])
    assert sorted((r.chunk_id, r.rows) for r in rows) == [(c.chunk_id, eu_days[c.chunk_id]) for c in DAYS[:2]]
    assert read_ledger(conn, eu, dag_id="backfill_eu") == rows  # before its plan ran: by the DAG
    assert len(read_ledger(conn, us, backfill_key=keys["us"])) == 3

    run = RunInfo(run_id=RUN_ID, state="running", start=DAYS[0].start, end=DAYS[-1].end, granularity="day",
                  started_at=DAYS[0].start, backfill_key=keys["eu"])  # fmt: skip
    tis = [TaskState(c.chunk_id, "success") for c in DAYS[:2]] + [TaskState(DAYS[2].chunk_id, None)]
    p = build_progress(eu, dag_id="backfill_eu", run=run, ledger_rows=rows, task_states=tis, validation=None,
                       now=DAYS[0].start + dt.timedelta(seconds=60))  # fmt: skip
    assert (p.counts["loaded"], p.counts["pending"], p.total) == (2, 1, 3)
    assert p.rows_loaded == eu_days[DAYS[0].chunk_id] + eu_days[DAYS[1].chunk_id]  # not the us rows of those days
    assert [c.rows for c in p.chunks] == [eu_days[DAYS[0].chunk_id], eu_days[DAYS[1].chunk_id], None]
    assert p.waits == {"load_s": 0.0, "pacing_s": 1.5, "chunks_waited": 1, "deferred_now": 0}  # us waited 4 s

    # the chunk log line's totals: this DAG's run only, though the other DAG's run has the same id
    assert run_totals(conn, eu, RUN_ID) == (2, p.rows_loaded)
    assert run_totals(conn, us, RUN_ID) == (3, 300)
    assert ledger_rate(conn, eu, keys["eu"]) == p.rows_loaded / sum(r.seconds for r in rows)


def test_a_ledger_from_before_the_wait_columns_still_counts_and_is_migrated(src_url, dst_url, pg):
    src = pg(src_url)
    seed_orders(src, rows=30, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    spec = spec_for(src_url, dst_url, "orders", "orders")
    transfer_chunk(spec, DAYS[0], run_id="r1")
    conn = pg(dst_url)
    with conn.cursor() as cur:  # the previous release's ledger: keyed, no wait columns
        cur.execute("ALTER TABLE backfill_ledger DROP COLUMN waited_load_s, DROP COLUMN waited_pacing_s")
    table = TableName.parse(spec.ledger_table)
    assert ledger.is_current(conn, table)  # its rows still count as done: the keys are this release's
    plan = build_plan(spec, "2024-01-01", "2024-01-04", dst_conn=conn, src_conn=pg(src_url))
    assert [c.chunk_id for c in plan.skipped] == [DAYS[0].chunk_id]
    (old,) = read_ledger(conn, spec, backfill_key=plan.backfill_key)
    assert (old.chunk_id, old.rows, old.waited_load_s, old.waited_pacing_s) == (DAYS[0].chunk_id, 10, None, None)

    transfer_chunk(spec, DAYS[1], run_id="r2", waited_load_s=2.0, waited_pacing_s=0.5)  # the next chunk migrates
    got = sorted(
        (r.chunk_id, r.waited_load_s, r.waited_pacing_s) for r in read_ledger(conn, spec, dag_id="backfill_orders")
    )
    assert got == [(DAYS[0].chunk_id, None, None), (DAYS[1].chunk_id, 2.0, 0.5)]
