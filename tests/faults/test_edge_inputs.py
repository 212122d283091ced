"""Inputs that are odd but legal: they must load exactly right (or warn), never fail or double-load.

DST gap and overlap days, empty chunks, NULL in the time column, and table/column names carrying
quotes, unicode and SQL (quoted as identifiers, so they are just names).
"""

from __future__ import annotations

import datetime as dt
import logging

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.plan import checks
from airflow_backfill_provider.core.chunks import plan_chunks, to_datetime
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.plan.planning import build_plan
from airflow_backfill_provider.core.spec import TableName
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.faults.conftest import Invariants, connect, create_destination, make_spec, query
from tests.faults.test_bad_inputs import run_plan_task

pytestmark = pytest.mark.faults

NY = "America/New_York"


# --- DST -------------------------------------------------------------------------------------------------
def _seed_every_10_minutes(src_url, lo_utc: str, hi_utc: str) -> int:
    """One order every 10 minutes of UTC time: uniform in real time, so a 25-hour day has 150 rows."""
    conn = connect(src_url)
    create_orders(conn)
    with conn.cursor() as cur:
        cur.execute(
            """INSERT INTO orders SELECT row_number() OVER (ORDER BY ts), 1, 'new', 1.00, ts, ts, NULL
               FROM generate_series(%s::timestamptz, %s::timestamptz - interval '1 minute', interval '10 minutes') ts""",
            (lo_utc, hi_utc),
        )
        cur.execute("SELECT count(*) FROM orders")
        n = cur.fetchone()[0]
    conn.close()
    return n


DST_DAYS = {
    # fall back: 01:00-02:00 happens twice, the day has 25 hours
    "overlap 2024-11-03": ("2024-11-02", "2024-11-05", "2024-11-03", 25),
    # spring forward: 02:00-03:00 does not exist, the day has 23 hours
    "gap 2024-03-10": ("2024-03-09", "2024-03-12", "2024-03-10", 23),
}


@pytest.mark.parametrize("granularity", ["day", "hour"])
@pytest.mark.parametrize("case", list(DST_DAYS))
def test_dst_days_load_every_row_exactly_once(src_url, dst_url, case, granularity):
    first, last, dst_day, hours = DST_DAYS[case]
    if granularity == "hour":  # the DST day alone: 23 or 25 one-hour chunks
        first, last = dst_day, to_datetime(dst_day, NY, what="start").add(days=1).format("YYYY-MM-DD")
    lo, hi = to_datetime(first, NY, what="start"), to_datetime(last, NY, what="end")
    total = _seed_every_10_minutes(src_url, lo.in_timezone("UTC").isoformat(), hi.in_timezone("UTC").isoformat())
    create_destination(dst_url)
    inv = Invariants(src_url, dst_url)
    spec = make_spec(src_url, dst_url, timezone=NY, granularity=granularity)
    plan = build_plan(spec, first, last, dst_conn=connect(dst_url))
    ids = [c.chunk_id for c in plan.chunks]
    assert len(ids) == len(set(ids)), "two chunks share a label"
    assert all(a.end == b.start for a, b in zip(plan.chunks, plan.chunks[1:])), "gap or overlap between chunks"
    results = [transfer_chunk(spec, c) for c in plan.chunks]
    assert sum(r.rows_extracted for r in results) == sum(r.inserted for r in results) == total  # each row once
    inv.check(plan.chunks)  # equal to the source, one ledger row per chunk with matching counts
    assert query(dst_url, "SELECT count(*), count(DISTINCT id) FROM orders") == [(total, total)]
    ledger = query(dst_url, "SELECT chunk_id, rows_extracted FROM backfill_ledger ORDER BY range_start")
    assert [r[0] for r in ledger] == ids
    if granularity == "day":
        assert dict(ledger)[dst_day] == hours * 6
    else:
        day_hours = [c for c in plan.chunks if c.start.format("YYYY-MM-DD") == dst_day]
        assert len(day_hours) == hours
        assert all(n == 6 for _, n in ledger)
        if hours == 25:  # both 01:00 hours are chunks of their own, with their offsets in the label
            assert {f"{dst_day}T01:00-04:00", f"{dst_day}T01:00-05:00"} <= set(ids)
        else:
            assert not any(i.startswith(f"{dst_day}T02:") for i in ids)
    # the two real instants called 01:30 on the fall-back day are both loaded, once each
    if hours == 25:
        both = query(
            dst_url,
            "SELECT count(*) FROM orders WHERE created_at IN ('2024-11-03T01:30-04:00', '2024-11-03T01:30-05:00')",
        )
        assert both == [(2,)]


def test_dst_local_times_in_params_are_resolved_predictably():
    """Documented: a nonexistent local time moves forward; an ambiguous one takes standard time; offsets win."""
    assert to_datetime("2024-03-10T02:30", NY, what="start").isoformat() == "2024-03-10T03:30:00-04:00"
    assert to_datetime("2024-11-03T01:30", NY, what="start").isoformat() == "2024-11-03T01:30:00-05:00"
    assert to_datetime("2024-11-03T01:30-04:00", NY, what="start").isoformat() == "2024-11-03T01:30:00-04:00"
    # dates (what the trigger form takes) are local midnights, never ambiguous in this zone
    assert to_datetime("2024-11-03", NY, what="start").isoformat() == "2024-11-03T00:00:00-04:00"


# --- empty chunks ------------------------------------------------------------------------------------------
def test_empty_chunks_are_ledgered_without_error(src_url, dst_url):
    seed_orders(connect(src_url), rows=100, days=1, start=dt.date(2024, 1, 2))  # only the 2nd of 4 days has rows
    create_destination(dst_url)
    spec = make_spec(src_url, dst_url)
    days = plan_chunks("2024-01-01", "2024-01-05", "day", "UTC")
    results = [transfer_chunk(spec, c) for c in days]
    assert [r.rows_extracted for r in results] == [0, 100, 0, 0]
    Invariants(src_url, dst_url).check(days)
    # done means done: the plan skips empty chunks too, and a rerun of one is a no-op
    assert build_plan(spec, "2024-01-01", "2024-01-05", dst_conn=connect(dst_url)).chunks == []
    assert transfer_chunk(spec, days[0]).rows_extracted == 0


# --- NULL in the time column --------------------------------------------------------------------------------
@pytest.fixture()
def null_time_source(src_url, dst_url):
    conn = connect(src_url)
    seed_orders(conn, rows=200, days=2, start=dt.date(2024, 1, 1))
    with conn.cursor() as cur:
        cur.execute("ALTER TABLE orders ALTER COLUMN created_at DROP NOT NULL")
        cur.execute(
            "INSERT INTO orders VALUES (901, 1, 'new', 1, NULL, now(), NULL), (902, 1, 'new', 1, NULL, now(), NULL), (903, 1, 'new', 1, NULL, now(), NULL)"
        )
        cur.execute("ANALYZE orders")
    conn.close()
    create_destination(dst_url)
    return src_url, dst_url


def test_null_time_rows_are_never_loaded_and_counted(null_time_source):
    src, dst = null_time_source
    conn = psycopg2.connect(src)
    found = checks.null_time_rows(conn, TableName.parse("orders"), "created_at")
    assert (found.count, found.exact) == (3, True)
    assert "has 3 row(s) with NULL in the time column 'created_at'" in found.message
    assert "will NOT be backfilled" in found.message
    conn.rollback()
    days = plan_chunks("2024-01-01", "2024-01-03", "day", "UTC")
    results = [transfer_chunk(make_spec(src, dst), c) for c in days]
    assert sum(r.rows_extracted for r in results) == 200  # the 3 NULL rows are in no [start, end) chunk
    assert query(dst, "SELECT count(*) FROM orders WHERE id > 900") == [(0,)]


def test_null_time_count_falls_back_to_statistics_when_slow(null_time_source, monkeypatch):
    src, _ = null_time_source
    monkeypatch.setattr(checks, "COUNT_TIMEOUT_MS", 200)
    locker = psycopg2.connect(src)  # holds the table so the exact count cannot finish in time
    with locker.cursor() as cur:
        cur.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
    conn = psycopg2.connect(src, options="-c statement_timeout=30000")
    try:
        found = checks.null_time_rows(conn, TableName.parse("orders"), "created_at")
        assert (found.count, found.exact) == (3, False)
        assert "about 3 row(s)" in found.message
        with conn.cursor() as cur:  # the short timeout did not leak into the rest of the plan's transaction
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "30s"
    finally:
        locker.rollback()
        locker.close()
        conn.close()


def test_not_null_time_column_is_not_even_counted(src_url):
    seed_orders(connect(src_url), rows=10, days=1)
    conn = psycopg2.connect(src_url)
    found = checks.null_time_rows(conn, TableName.parse("orders"), "created_at")
    assert (found.count, found.message) == (0, None)
    conn.close()


def test_plan_task_warns_about_null_time_rows(null_time_source, caplog, capfd):
    src, dst = null_time_source
    with caplog.at_level(logging.WARNING):
        chunks, xcom = run_plan_task(make_spec(src, dst).model_dump(mode="json"))
    assert len(chunks) == 2 and xcom["plan"]["chunks"] == 2  # a warning, not a failure
    out = caplog.text + "".join(capfd.readouterr())
    assert "has 3 row(s) with NULL in the time column 'created_at'" in out
    assert query(dst, "SELECT to_regclass('backfill_ledger')") == [(None,)]  # planning wrote nothing


# --- names with quotes, unicode and SQL are just names ------------------------------------------------------
ODD_TABLE = 'Bestellungen "ü"'
ODD_COLS = {"id": 'Nr "x"', "time": "Erstellt am", "version": "geändert'", "note": "note; DROP TABLE x"}
ODD_LEDGER = 'public.backfill ledger "ü"; --'


def _create_odd(url: str, seed: bool) -> None:
    conn = connect(url)
    i, t, v, n = (sql.Identifier(ODD_COLS[k]) for k in ("id", "time", "version", "note"))
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS x (i int)")
        cur.execute(
            sql.SQL(
                "CREATE TABLE {tab} ({i} bigint PRIMARY KEY, {t} timestamptz NOT NULL, {v} timestamptz NOT NULL, {n} text)"
            ).format(tab=sql.Identifier(ODD_TABLE), i=i, t=t, v=v, n=n)
        )
        if seed:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {tab} SELECT g, '2024-01-01'::timestamptz + g * interval '1 minute', now(), "
                    "'Grüße ''; DROP TABLE x; --' FROM generate_series(1, 2000) g"
                ).format(tab=sql.Identifier(ODD_TABLE))
            )
    conn.close()


def test_names_with_quotes_unicode_and_sql_backfill_correctly(src_url, dst_url):
    _create_odd(src_url, seed=True)
    _create_odd(dst_url, seed=False)
    spec = make_spec(
        src_url,
        dst_url,
        source_table=ODD_TABLE,
        destination_table=f"public.{ODD_TABLE}",
        time_column=ODD_COLS["time"],
        key_columns=[ODD_COLS["id"]],
        version_column=ODD_COLS["version"],
        ledger_table=ODD_LEDGER,
    )
    plan = build_plan(spec, "2024-01-01", "2024-01-03", dst_conn=connect(dst_url))
    results = [transfer_chunk(spec, c) for c in plan.chunks]
    assert sum(r.inserted for r in results) == 2000
    assert sum(r.unchanged for r in (transfer_chunk(spec, c) for c in plan.chunks)) == 2000  # idempotent
    rows = sql.SQL("SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {} t").format(
        sql.Identifier(ODD_TABLE)
    )
    assert query(src_url, rows) == query(dst_url, rows)
    ledger = sql.SQL("SELECT count(*), sum(rows_extracted) FROM {}").format(
        sql.Identifier(*TableName.parse(ODD_LEDGER).parts)
    )
    assert query(dst_url, ledger) == [(2, 2000)]
    assert build_plan(spec, "2024-01-01", "2024-01-03", dst_conn=connect(dst_url)).chunks == []  # ledger read back
    for url in (src_url, dst_url):
        assert query(url, "SELECT to_regclass('x') IS NOT NULL") == [(True,)]
