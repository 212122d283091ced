"""The ledger's key-range columns: a ledger from before them covers nothing and is migrated in place on first use."""

from __future__ import annotations

import datetime as dt

import psycopg2

from airflow_backfill_provider.ledger import table as ledger
from airflow_backfill_provider.ledger.coverage import Coverage, rect
from airflow_backfill_provider.prepare.identity import BackfillIdentity
from airflow_backfill_provider.core.spec import TableName
from tests.conftest import fetch_all
from tests.specs import make_spec

OLD_LEDGER = """CREATE TABLE backfill_ledger (
    target_table text NOT NULL, range_start timestamptz NOT NULL, range_end timestamptz NOT NULL,
    chunk_id text NOT NULL, rows_extracted bigint NOT NULL, rows_inserted bigint NOT NULL,
    rows_updated bigint NOT NULL, rows_unchanged bigint NOT NULL, seconds double precision NOT NULL,
    dag_id text, run_id text, finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_table, range_start, range_end))"""

JAN = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
FEB = dt.datetime(2024, 2, 1, tzinfo=dt.timezone.utc)
STATS = {"extracted": 10, "inserted": 10, "updated": 0, "unchanged": 0, "seconds": 0.5}
T = TableName.parse("backfill_ledger")
B = BackfillIdentity("public.orders", "k1", {})


def test_old_ledger_is_read_then_migrated_and_keeps_its_rows(dst_url, pg):
    pg(dst_url).cursor().execute(OLD_LEDGER)
    pg(dst_url).cursor().execute(
        "INSERT INTO backfill_ledger VALUES ('public.orders', %s, %s, '2024-01', 10, 10, 0, 0, 0.5, 'd', 'r')",
        (JAN, FEB),
    )
    conn = psycopg2.connect(dst_url)
    try:
        # read-only (a plan, a dry run): a previous release's rows count as done for no backfill
        assert not Coverage(ledger.done_rects(conn, T, B, "id")).covers(rect(JAN, FEB, 5, 10))
        ledger.ensure_table(conn, T)  # a chunk's first use migrates it
        with conn.cursor() as cur:  # two key ranges of the same month now fit beside the time chunk
            for lo, hi in ((None, 100), (100, None)):
                ledger.record(
                    cur,
                    T,
                    backfill=B,
                    chunk_id=f"id {lo}..{hi}",
                    start=JAN,
                    end=FEB,
                    stats=STATS,
                    dag_id="d",
                    run_id="r2",
                    key_column="id",
                    key_lo=lo,
                    key_hi=hi,
                )
        conn.commit()
        ledger.ensure_table(conn, T)  # idempotent
        rects = ledger.done_rects(conn, T, B, "id")
        assert sorted((r.k0, r.k1) for r in rects) == [(-float("inf"), 100), (100, float("inf"))]
        assert Coverage(rects).covers(rect(JAN, FEB, 5, 10))
        # another key column's ranges mean other rows: they cover nothing for "order_no"
        assert len(ledger.done_rects(conn, T, B, "order_no")) == 0
        assert len(ledger.done_rects(conn, T, B, "id", run_id="r2")) == 2
        assert len(ledger.done_rects(conn, T, BackfillIdentity("public.orders", "other", {}), "id")) == 0
    finally:
        conn.close()
    assert fetch_all(dst_url, "SELECT count(*) FROM backfill_ledger") == [(3,)]
    pk = fetch_all(
        dst_url,
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'backfill_ledger'::regclass AND contype = 'p'",
    )
    assert pk == [("PRIMARY KEY (target_table, backfill_key, range_start, range_end, key_lo, key_hi)",)]


def test_measured_rate_reads_recent_non_empty_chunks(dst_url):
    conn = psycopg2.connect(dst_url)
    try:
        assert ledger.measured_rate(conn, T, "public.orders") is None
        ledger.ensure_table(conn, T)
        with conn.cursor() as cur:
            for i, (rows, secs) in enumerate(((1000, 1.0), (3000, 1.0), (0, 0.2))):
                ledger.record(
                    cur,
                    T,
                    backfill=B,
                    chunk_id=str(i),
                    start=JAN + dt.timedelta(days=i),
                    end=JAN + dt.timedelta(days=i + 1),
                    stats={**STATS, "extracted": rows, "seconds": secs},
                    dag_id="d",
                    run_id="r",
                )
        conn.commit()
        assert ledger.measured_rate(conn, T, "public.orders") == (2000.0, 2)
    finally:
        conn.close()


def test_day_chunks_in_the_ledger_cover_a_week_plan_on_real_postgres(src_url, dst_url, pg):
    """Resume across plan changes: switching day -> week reloads nothing already covered."""
    from tests.seed import create_orders, seed_orders
    from airflow_backfill_provider.plan.planning import build_plan
    from airflow_backfill_provider.transfer.chunk import transfer_chunk

    seed_orders(pg(src_url), rows=600, days=31, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    spec = make_spec(src_url, dst_url, destination_table="orders", watermark={"enabled": False})

    def plan(granularity, start="2024-01-01", end="2024-01-15"):
        d = psycopg2.connect(dst_url)
        try:
            return build_plan(spec, start, end, granularity=granularity, dst_conn=d)
        finally:
            d.close()

    for c in plan("day").chunks:  # 14 days: 2024-01-01 (a Monday) .. 2024-01-14
        transfer_chunk(spec, c)
    weeks = plan("week")
    assert weeks.chunks == [] and len(weeks.skipped) == 2
    month = plan("month", end="2024-02-01")
    assert [c.chunk_id for c in month.chunks] == ["2024-01"]  # partly covered: loaded again, idempotently
