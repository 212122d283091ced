"""Live ingest and the backfill agree on time for naive and date cursors, whatever the servers' TimeZone.

A naive ``timestamp`` cursor is wall time in the spec's timezone: live ingest's lower bound is a naive
literal (timebounds.after) and the watermark is the cursor's maximum read in the spec's timezone
(timebounds.instant_sql). The backfill clips its range at that watermark, so backfill + live load
every source row, none falls between them.
"""

from __future__ import annotations

import datetime as dt

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.live import run_live_ingest
from airflow_backfill_provider.plan.planning import build_plan
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all
from tests.session_helpers import set_database_defaults
from tests.specs import table_spec

ZONE = "America/New_York"
FILL = {
    # every 30 minutes of wall time over 2024-11-02 .. 2024-11-03 (the repeated 01:00 hour included)
    "timestamp": "INSERT INTO ev SELECT g, timestamp '2024-11-02' + g * interval '30 minutes', g % 5"
    " FROM generate_series(0, 95) g",
    "date": "INSERT INTO ev SELECT g, date '2024-10-30' + g / 4, g % 5 FROM generate_series(0, 23) g",
}
START_FROM = {"timestamp": "2024-11-03T12:00:00", "date": "2024-11-03T12:00:00"}


@pytest.mark.parametrize("kind", ["timestamp", "date"])
def test_live_and_backfill_together_load_every_row_of_a_naive_or_date_cursor(databases, kind):
    src, dst = databases.create("ltsrc"), databases.create("ltdst")
    set_database_defaults(src, timezone="UTC")
    set_database_defaults(dst, timezone="Asia/Kolkata")
    for url in (src, dst):
        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE TABLE ev (id bigint PRIMARY KEY, t {} NOT NULL, v integer)").format(sql.SQL(kind))
            )
            if url == src:
                cur.execute(FILL[kind])
        conn.close()
    spec = table_spec(
        src,
        dst,
        "ev",
        time_column="t",
        timezone=ZONE,
        live={"enabled": True, "lookback_s": 60, "start_from": START_FROM[kind]},
    )
    run_live_ingest(spec)
    top = fetch_all(src, "SELECT max(t) FROM ev")[0][0]
    (wm,) = fetch_all(dst, "SELECT watermark FROM backfill_watermarks")[0]
    # the watermark is the newest cursor value read as New York time, not as the session's TimeZone
    naive_top = top if kind == "timestamp" else dt.datetime.combine(top, dt.time(0))
    assert wm.astimezone(dt.timezone.utc) == naive_top.replace(tzinfo=dt.timezone.utc) + dt.timedelta(hours=5), (
        f"watermark {wm} for newest {top}"
    )
    # live read everything from start_from's local time on (12:00 wall time; a date keeps its whole day)
    lowest = dt.datetime(2024, 11, 3, 12) if kind == "timestamp" else dt.date(2024, 11, 3)
    want_live = {i for i, t in fetch_all(src, "SELECT id, t FROM ev") if t >= lowest}
    got_live = {r[0] for r in fetch_all(dst, "SELECT id FROM ev")}
    assert want_live <= got_live, f"live missed {sorted(want_live - got_live)[:5]}"

    # the backfill of everything before: clipped at the watermark, it leaves no row between the two
    conn = psycopg2.connect(dst)
    try:
        plan = build_plan(spec, "2024-10-01", "2024-12-01", dst_conn=conn)
    finally:
        conn.close()
    assert plan.clipped
    for chunk in plan.chunks:
        transfer_chunk(spec, chunk)
    assert fetch_all(dst, "SELECT id, t, v FROM ev ORDER BY id") == fetch_all(
        src, "SELECT id, t, v FROM ev ORDER BY id"
    )
