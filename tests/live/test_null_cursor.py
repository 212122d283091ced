"""No row falls between the backfill and live ingest (issue 12 item 4), and what "late" means.

The contract (docs/live-and-swap.md): the backfill loads rows whose time column is before the
watermark W; live ingest loads rows whose cursor is after W - lookback OR whose time column is at or
after W - lookback. So a row created after W is loaded by live ingest whatever its cursor: NULL
(never updated), or older than its time column. Before the fix live ingest read ``cursor > W - lookback``
only, and such rows were loaded by neither path.
"""

import datetime as dt

import pytest
from psycopg2 import sql

from airflow_backfill_provider.live import advance_watermark, ensure_watermark_table, run_live_ingest
from airflow_backfill_provider.plan.planning import build_plan
from airflow_backfill_provider.core.spec import TableName
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all
from tests.specs import table_spec

W = "2024-01-05T00:00:00+00:00"  # live ingest starts here (start_from): the backfill is clipped at it


def make_spec(src, dst, **over):
    """ev, versioned like orders, with live ingest from W and no look-back."""
    live = {"enabled": True, "start_from": W, "lookback_s": 0}
    return table_spec(src, dst, "ev", time_column="created_at", version_column="updated_at", live=live, **over)


def create(conn, time_type):
    conn.cursor().execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS ev (id int PRIMARY KEY, created_at {t} NOT NULL, updated_at timestamptz, v text)"
        ).format(t=sql.SQL(time_type))  # a constant of this test
    )


def set_watermark(dst, value):
    """As live ingest leaves it after a run up to ``value`` (through the one writer)."""
    table = TableName.parse("public.backfill_watermarks")
    ensure_watermark_table(dst, table)
    with dst.cursor() as cur:
        advance_watermark(cur, table, "public.ev", dt.datetime.fromisoformat(value))


# cursor (updated_at) of each row, relative to its time column: all kinds must be loaded by one path
CURSORS = {
    "normal": "created_at::timestamptz + interval '1 minute'",
    "null": "NULL",
    "older than its time column": "'2023-06-01Z'",
}


@pytest.mark.parametrize("spec_tz", ["UTC", "America/New_York", "Asia/Kolkata"])
@pytest.mark.parametrize("time_type", ["timestamptz", "timestamp", "date"])
def test_rows_after_the_watermark_are_live_ingests_whatever_their_cursor(time_type, spec_tz, src_url, dst_url, pg):
    """W is 19:00 the day before in New York and 05:30 in Kolkata: for a ``date`` or naive ``timestamp``
    column the watermark falls inside a local day, so the backfill's last chunk and live ingest's time arm
    meet mid-day; every row must still be loaded (by one path or both: the upsert makes both harmless)."""
    src, dst = pg(src_url), pg(dst_url)
    for conn in (src, dst):
        create(conn, time_type)
    # 10 days of rows, 2024-01-01 .. 01-10 (W is 01-05): every cursor kind on both sides of W
    for i, (kind, expr) in enumerate(sorted(CURSORS.items())):
        src.cursor().execute(
            sql.SQL(
                "INSERT INTO ev SELECT g * 10 + %s, ('2024-01-01Z'::timestamptz + (g - 1) * interval '1 day' + interval '3 hours')::{t},"
                " NULL, %s FROM generate_series(1, 10) g"
            ).format(t=sql.SQL(time_type)),
            (i, kind),
        )
        src.cursor().execute(sql.SQL("UPDATE ev SET updated_at = {e} WHERE v = %s").format(e=sql.SQL(expr)), (kind,))
    # and rows never updated (NULL cursor) at W - 1 min, W, W + 1 min in the spec's timezone, and on the
    # local days either side of W: where the backfill's end and live ingest's time arm meet
    local = "%(w)s::timestamptz" if time_type == "timestamptz" else "(%(w)s::timestamptz AT TIME ZONE %(tz)s)"
    src.cursor().execute(
        sql.SQL(
            "INSERT INTO ev SELECT 1000 + g, ({local} + g * interval '1 minute')::{t}, NULL, 'edge'"
            " FROM unnest(ARRAY[-1, 0, 1, -1440, 1440]) g"
        ).format(local=sql.SQL(local), t=sql.SQL(time_type)),
        {"w": W, "tz": spec_tz},
    )
    spec = make_spec(src_url, dst_url, timezone=spec_tz)
    set_watermark(dst, W)  # live ingest has run up to W
    # from 2023-12-31: the first rows (01-01 03:00 UTC) are still 2023-12-31 in New York
    plan = build_plan(spec, "2023-12-31", "2024-01-11", dst_conn=dst)
    assert plan.clipped and plan.end == dt.datetime.fromisoformat(W)
    for chunk in plan.chunks:
        transfer_chunk(spec, chunk)
    live = run_live_ingest(spec)  # its next run
    q = "SELECT v, count(*) FROM ev GROUP BY v ORDER BY v"
    assert fetch_all(dst_url, q) == fetch_all(src_url, q) == [("edge", 5), *((k, 10) for k in sorted(CURSORS))]
    assert fetch_all(dst_url, "SELECT t::text FROM ev t ORDER BY id") == fetch_all(
        src_url, "SELECT t::text FROM ev t ORDER BY id"
    )
    if spec_tz == "UTC":
        # live ingest took every row at or after W: 6 days x 3 cursor kinds (before the fix: the 6 "normal" ones),
        # and the 3 edge rows at or after W
        assert live.rows_extracted == 18 + 3


def test_a_late_update_older_than_the_lookback_needs_a_reprocess_of_its_range(src_url, dst_url, pg):
    """A change whose cursor is older than W - lookback when it becomes visible, to a row from before W: live
    ingest never reads it (by contract); the backfill does when its chunk is loaded again (reprocess)."""
    src, dst = pg(src_url), pg(dst_url)
    for conn in (src, dst):
        create(conn, "timestamptz")
    src.cursor().execute(
        "INSERT INTO ev SELECT g, '2024-01-01Z'::timestamptz + g * interval '1 hour', '2024-01-01Z'::timestamptz"
        " + g * interval '1 hour', 'v1' FROM generate_series(0, 95) g"
    )
    spec = make_spec(src_url, dst_url)
    run_live_ingest(spec)
    for chunk in build_plan(spec, "2024-01-01", "2024-01-10", dst_conn=dst).chunks:
        transfer_chunk(spec, chunk)
    same = "SELECT t::text FROM ev t ORDER BY id"
    assert fetch_all(dst_url, same) == fetch_all(src_url, same)
    # a backdated correction (e.g. a replayed import) to a row of 01-02, stamped long before W - lookback
    src.cursor().execute("UPDATE ev SET v = 'late', updated_at = '2024-01-02T12:00Z' WHERE id = 30")
    assert run_live_ingest(spec).rows_extracted == 0  # the documented limit: live ingest does not see it
    assert build_plan(spec, "2024-01-02", "2024-01-03", dst_conn=dst).chunks == []  # that day is in the ledger
    again = build_plan(spec, "2024-01-02", "2024-01-03", reprocess=True, dst_conn=dst)
    assert [transfer_chunk(spec, c).updated for c in again.chunks] == [1]  # only the late row is rewritten
    assert fetch_all(dst_url, same) == fetch_all(src_url, same)


@pytest.mark.parametrize(
    "kind, lower, expected",
    [
        ("timestamptz", "2024-03-10T06:30:00+00:00", "2024-03-10T06:30:00+00:00"),  # an instant stays an instant
        ("timestamp", "2024-03-10T06:30:00+00:00", "2024-03-10T01:30:00"),  # wall time in the spec's zone (EST)
        ("date", "2024-03-10T06:30:00+00:00", "2024-03-10"),  # the local day containing it: never less
        ("date", "2024-03-10T04:30:00+00:00", "2024-03-09"),  # 23:30 local on the 9th: the 9th, not the 10th
        # fall-back night, first pass of 01:30 (EDT): rounded down to where the repeat starts, never later
        ("timestamp", "2024-11-03T05:30:00+00:00", "2024-11-03T01:00:00"),
    ],
)
def test_the_time_arm_bound_is_read_in_the_columns_own_type_and_the_spec_timezone(kind, lower, expected):
    from airflow_backfill_provider.core.timebounds import at_or_before

    at = dt.datetime.fromisoformat(lower)
    assert at_or_before(kind, at, "America/New_York").isoformat() == expected
