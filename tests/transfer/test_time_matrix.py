"""The time matrix on real PostgreSQL (issue 12): time column type x spec timezone x server TimeZone.

Time column ``date`` / ``timestamp`` / ``timestamptz``; spec timezone UTC, America/New_York,
Asia/Kolkata, Australia/Lord_Howe (30-minute DST), America/Santiago (DST at local midnight); source
and destination databases set to other TimeZones (``ALTER DATABASE ... SET timezone``); hour and day
chunks across both DST changes of the zone. For each case:

- every source row of the range lands in exactly one chunk (one ``UNION ALL`` of the chunks' own
  selects, the same ``chunk_select`` + ``timebounds`` the transfer runs), under two session TimeZones;
- the union of the chunks is the range: the set equals what Python's zoneinfo says is in the range;
- the real chunk path (``transfer_chunk``) leaves the destination equal to the source for the range,
  with every row extracted once.

One table per type, one pair of databases for the module, many rows per round trip.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from zoneinfo import ZoneInfo

import pendulum
import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core import sql as q
from airflow_backfill_provider.core import timebounds
from airflow_backfill_provider.core.chunks import day_start, plan_chunks
from airflow_backfill_provider.core.spec import TableName
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all
from tests.specs import table_spec

SRC_TZ, DST_TZ = "Pacific/Chatham", "Atlantic/Azores"  # neither is a spec timezone below
_UTC = dt.timezone.utc
TABLES = {"date": "ev_date", "timestamp": "ev_ts", "timestamptz": "ev_tstz"}
DDL = """
CREATE TABLE ev_date (id bigint PRIMARY KEY, t date NOT NULL, v integer);
CREATE TABLE ev_ts (id bigint PRIMARY KEY, t timestamp NOT NULL, v integer);
CREATE TABLE ev_tstz (id bigint PRIMARY KEY, t timestamptz NOT NULL, v integer);
"""
# every 15 minutes from 2024-03-01 for ~250 days (naive values include the spring-forward gaps and
# the repeated fall-back hours of every zone); three rows per date
FILL = """
INSERT INTO ev_tstz SELECT g, timestamptz '2024-03-01 00:00+00' + g * interval '15 minutes', g % 97
  FROM generate_series(0, 24000) g;
INSERT INTO ev_ts SELECT g, timestamp '2024-03-01 00:00' + g * interval '15 minutes', g % 97
  FROM generate_series(0, 24000) g;
INSERT INTO ev_date SELECT g, date '2024-03-01' + g / 3, g % 97 FROM generate_series(0, 750) g;
"""
NY_CHANGES = ["2024-03-10T07:00Z", "2024-11-03T06:00Z"]
# the zone's two DST changes in 2024, as UTC instants (zones without DST use New York's)
CHANGES = {
    "UTC": NY_CHANGES,
    "America/New_York": NY_CHANGES,
    "Asia/Kolkata": NY_CHANGES,
    "Australia/Lord_Howe": ["2024-04-06T15:00Z", "2024-10-05T15:30Z"],  # back 30 min; forward 30 min
    "America/Santiago": ["2024-04-07T03:00Z", "2024-09-08T04:00Z"],  # 24:00 -> 23:00; 24:00 -> 01:00
}


@pytest.fixture(scope="module")
def matrix_dbs(databases):
    src, dst = databases.create("tmsrc"), databases.create("tmdst")
    admin = psycopg2.connect(src)
    admin.autocommit = True
    with admin.cursor() as cur:
        for url, tz in ((src, SRC_TZ), (dst, DST_TZ)):
            name = url.rsplit("/", 1)[1]
            cur.execute(sql.SQL("ALTER DATABASE {} SET timezone = {}").format(sql.Identifier(name), sql.Literal(tz)))
    admin.close()
    for url, fill in ((src, True), (dst, False)):
        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            cur.execute(DDL)
            if fill:
                cur.execute(FILL)
        conn.close()
    return src, dst


def windows(zone: str):
    """(granularity, lo, hi) around each DST change: the change's local day and the next, and 4 hours
    across the change (at Lord Howe's and Kolkata's half hours, partial hour chunks at the edges)."""
    tz = ZoneInfo(zone)
    for change in CHANGES[zone]:
        instant = pendulum.parse(change)
        day = instant.astimezone(tz).date()
        yield "day", day_start(day, zone), day_start(day + dt.timedelta(days=2), zone)
        yield "hour", instant.subtract(hours=2).in_timezone(zone), instant.add(hours=2).in_timezone(zone)


def expected_ids(rows, kind: str, zone: str, lo, hi) -> set[int]:
    """What is in [lo, hi), by Python's zoneinfo (window edges are never in a DST change)."""
    tz = ZoneInfo(zone)
    if kind == "timestamptz":
        return {i for i, v in rows if lo <= v < hi}
    a, b = lo.astimezone(tz).replace(tzinfo=None), hi.astimezone(tz).replace(tzinfo=None)
    if kind == "date":
        # day windows start at the first instant of a local day (01:00 on Santiago's 2024-09-08)
        return {i for i, v in rows if a.date() <= v < b.date()}
    return {i for i, v in rows if a <= v < b}


def chunk_members(conn, kind: str, zone: str, chunks) -> list[tuple[int, int]]:
    """(chunk index, id) for every chunk, in ONE statement built from the chunks' own selects."""
    table = TableName.parse(TABLES[kind])
    parts = [
        q.chunk_select(
            table, [sql.Literal(i), sql.Identifier("id")], "t", *timebounds.bounds(kind, c.start, c.end, zone)
        )
        for i, c in enumerate(chunks)
    ]
    with conn.cursor() as cur:
        cur.execute(sql.SQL(" UNION ALL ").join(parts))
        return sorted(cur.fetchall())


def make_spec(src: str, dst: str, kind: str, zone: str, granularity: str):
    return table_spec(
        src, dst, TABLES[kind], time_column="t", name=f"tm_{kind}", timezone=zone, granularity=granularity,
        throttle={"max_active": 1000},
    )  # fmt: skip


@pytest.mark.parametrize("zone", list(CHANGES))
def test_every_row_lands_in_exactly_one_chunk_and_the_destination_equals_the_source(matrix_dbs, zone):
    src, dst = matrix_dbs
    source_rows = {
        kind: fetch_all(src, sql.SQL("SELECT id, t FROM {}").format(sql.Identifier(t))) for kind, t in TABLES.items()
    }
    check = psycopg2.connect(src)  # a plain session: its TimeZone is the database's (Pacific/Chatham)
    with check.cursor() as cur:
        cur.execute("SHOW timezone")
        assert cur.fetchone()[0] == SRC_TZ
    try:
        for kind, table in TABLES.items():
            for granularity, lo, hi in windows(zone):
                if kind == "date" and granularity == "hour":
                    continue  # refused (test below)
                chunks = plan_chunks(lo, hi, granularity, zone)
                want = expected_ids(source_rows[kind], kind, zone, lo, hi)
                members = chunk_members(check, kind, zone, chunks)
                with check.cursor() as cur:
                    cur.execute("SET timezone = 'Asia/Tokyo'")  # a second session TimeZone: same answer
                assert chunk_members(check, kind, zone, chunks) == members, f"{kind} {granularity}: depends on TimeZone"
                with check.cursor() as cur:
                    cur.execute("RESET timezone")
                ids = Counter(i for _, i in members)
                twice = sorted(i for i, n in ids.items() if n > 1)
                where = f"{kind} {granularity} chunks of [{lo}, {hi}) in {zone}"
                assert not twice, f"{where}: rows {twice[:5]} in more than one chunk"
                assert set(ids) == want, (
                    f"{where}: missing {sorted(want - set(ids))[:5]}, extra {sorted(set(ids) - want)[:5]}"
                )
                if granularity == "day":  # a day chunk holds exactly the rows of its local day
                    by_id = dict(source_rows[kind])
                    for idx, i in members:
                        v = by_id[i]
                        local = (
                            v.astimezone(ZoneInfo(zone)).date()
                            if kind == "timestamptz"
                            else (v.date() if kind == "timestamp" else v)
                        )
                        assert local.isoformat() == chunks[idx].chunk_id, (
                            f"{where}: row {i} ({v}) in {chunks[idx].chunk_id}"
                        )

                # the real chunk path, into a destination whose TimeZone is yet another one
                with psycopg2.connect(dst) as d, d.cursor() as cur:
                    cur.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
                spec = make_spec(src, dst, kind, zone, granularity)
                extracted = sum(transfer_chunk(spec, c).rows_extracted for c in chunks)
                assert extracted == len(want), f"{where}: {extracted} rows extracted for {len(want)} in range"
                select = sql.SQL("SELECT id, t, v FROM {} WHERE id = ANY(%s) ORDER BY id").format(sql.Identifier(table))
                assert fetch_all(dst, select, (sorted(want),)) == fetch_all(src, select, (sorted(want),)), where
                assert fetch_all(dst, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))[0][0] == len(
                    want
                )
    finally:
        check.close()


def test_new_york_repeated_and_missing_hours_of_naive_timestamps(matrix_dbs):
    """Naive 01:30 on 2024-11-03 (a repeated hour) and 02:30 on 2024-03-10 (no clock showed it): one chunk each."""
    src, _ = matrix_dbs
    zone = "America/New_York"
    conn = psycopg2.connect(src)
    try:
        for day, naive, chunk_id in (
            ("2024-11-03", "2024-11-03 01:30", "2024-11-03T01:00-05:00"),
            ("2024-03-10", "2024-03-10 02:30", "2024-03-10T01:00-05:00"),
        ):
            chunks = plan_chunks(day, pendulum.parse(day).add(days=1).to_date_string(), "hour", zone)
            (row_id,) = fetch_all(src, "SELECT id FROM ev_ts WHERE t = %s", (naive,))[0]
            holders = [chunks[idx].chunk_id for idx, i in chunk_members(conn, "timestamp", zone, chunks) if i == row_id]
            assert holders == [chunk_id]
    finally:
        conn.close()


def test_hour_chunks_on_a_date_column_are_refused_before_any_write(matrix_dbs):
    src, dst = matrix_dbs
    from airflow_backfill_provider.core.exceptions import PermanentChunkError

    spec = make_spec(src, dst, "date", "UTC", "hour").model_copy(update={"ledger_table": "public.tm_refused_ledger"})
    chunk = plan_chunks("2024-03-10", "2024-03-10T01:00", "hour", "UTC")[0]
    with pytest.raises(PermanentChunkError, match=r"granularity='hour' on time_column 't'.*granularity: day"):
        transfer_chunk(spec, chunk)
    assert fetch_all(dst, "SELECT to_regclass('public.tm_refused_ledger')") == [(None,)]  # nothing written
