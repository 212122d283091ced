"""First load of an empty range straight into the target (transfer/firstload.py), on real PostgreSQL.

The promise: the direct COPY is only a faster route to what the staging path writes. Where it would
differ (triggers, rules, row-level security, a partitioned target, destination-side casts) the chunk
stages as before; where a key is in the target after all, the COPY is rolled back and the chunk
upserts newer-wins, with counts that add up.
"""

from __future__ import annotations

import datetime as dt

import pendulum
import psycopg2
import psycopg2.extensions
import pytest

from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.connections import open_destination, open_source
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.transfer.chunk import Sessions, transfer_chunk
from tests.conftest import fetch_all
from tests.seed import create_orders, seed_orders
from tests.specs import make_spec

DAY = pendulum.datetime(2023, 1, 2)
CHUNK = Chunk("2023-01-02", DAY, DAY.add(days=1))
COLUMNS = "id, customer_id, status, amount::text, created_at, updated_at, note"


class _Recording(psycopg2.extensions.cursor):
    def execute(self, query, vars=None):
        self.connection.statements.append(self.mogrify(query, vars).decode())
        return super().execute(query, vars)

    def copy_expert(self, query, file, size=8192):
        self.connection.statements.append(query if isinstance(query, str) else query.as_string(self.connection))
        return super().copy_expert(query, file, size)


def _load(spec, src, dst, chunk=CHUNK):
    """One chunk on a recorded destination session: (result, 'direct' or 'staged')."""
    s = open_source(spec, "backfill:test:firstload", src)
    d = open_destination(spec, "backfill:test:firstload", dst)
    d.statements = []
    d.cursor_factory = _Recording
    try:
        result = transfer_chunk(spec, chunk, sessions=Sessions(s, d))
        staged = any("CREATE TEMP TABLE" in q for q in d.statements)
        direct = any(q.startswith('COPY "public"."orders"') for q in d.statements)
        return result, ("staged" if staged else "direct") if staged != direct else "both"
    finally:
        s.close()
        d.close()


def _source_day(src, chunk=CHUNK):
    return fetch_all(
        src,
        f"SELECT {COLUMNS} FROM orders WHERE created_at >= %s AND created_at < %s ORDER BY id",
        (chunk.start, chunk.end),
    )


@pytest.fixture()
def tables(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2023, 1, 1))
    create_orders(pg(dst_url))
    with pg(dst_url).cursor() as cur:  # what a time chunk's emptiness check probes
        cur.execute("CREATE INDEX ON public.orders (created_at)")
    return src_url, dst_url


@pytest.mark.parametrize("copy_format", ["binary", "text"])
def test_an_empty_range_is_copied_straight_in_and_a_rerun_upserts(tables, copy_format):
    src, dst = tables
    spec = make_spec(copy_format=copy_format)
    result, path = _load(spec, src, dst)
    assert path == "direct" and (result.rows_extracted, result.inserted, result.updated) == (100, 100, 0)
    assert fetch_all(dst, f"SELECT {COLUMNS} FROM public.orders ORDER BY id") == _source_day(src)
    again, path = _load(spec, src, dst)
    assert path == "staged" and (again.inserted, again.updated, again.unchanged) == (0, 0, 100)
    (ledger,) = fetch_all(dst, "SELECT rows_extracted, rows_inserted FROM public.backfill_ledger")
    assert ledger == (100, 0)  # the rerun's figures replaced the first load's


@pytest.mark.parametrize(
    "ddl",
    [
        # COPY fires triggers (and foreign keys) like INSERT, but one that skips rows breaks the counts
        "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;"
        " CREATE TRIGGER keep BEFORE INSERT ON public.orders FOR EACH ROW EXECUTE FUNCTION keep()",
        # COPY FROM refuses a table with row-level security (for a user it applies to)
        "ALTER TABLE public.orders ENABLE ROW LEVEL SECURITY",
        # the staging path casts this column in the destination (a domain is checked there, by name)
        "CREATE DOMAIN short_note AS text CHECK (length(VALUE) < 100);"
        " ALTER TABLE public.orders ALTER COLUMN note TYPE short_note",
        # no index to check the range with: a scan per chunk would cost more than it saves
        "DROP INDEX public.orders_created_at_idx",
    ],
    ids=["trigger", "row level security", "domain cast", "no time index"],
)
def test_where_a_plain_copy_would_differ_the_chunk_stages(tables, pg, ddl):
    src, dst = tables
    with pg(dst).cursor() as cur:
        cur.execute(ddl)
    result, path = _load(make_spec(), src, dst)
    assert path == "staged" and result.inserted == 100
    assert fetch_all(dst, f"SELECT {COLUMNS} FROM public.orders ORDER BY id") == _source_day(src)


def test_a_target_with_rules_is_refused_not_copied_around_them(tables, pg):
    """COPY ignores rules: a direct COPY would load past the user's rule. The staging path's upsert refuses
    such a table (PostgreSQL: ON CONFLICT cannot be used with INSERT rules), and so does the chunk."""
    src, dst = tables
    with pg(dst).cursor() as cur:
        cur.execute(
            "CREATE TABLE audit (id bigint);"
            " CREATE RULE audit AS ON INSERT TO public.orders DO ALSO INSERT INTO audit VALUES (NEW.id)"
        )
    with pytest.raises(PermanentChunkError, match="rules"):
        _load(make_spec(), src, dst)
    assert fetch_all(dst, "SELECT count(*) FROM public.orders") == [(0,)]


def test_a_partitioned_target_stages(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2023, 1, 1))
    with pg(dst_url).cursor() as cur:
        cur.execute(
            "CREATE TABLE public.orders (id bigint, customer_id integer NOT NULL, status text NOT NULL,"
            " amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,"
            " note text, PRIMARY KEY (id)) PARTITION BY RANGE (id);"
            " CREATE TABLE orders_lo PARTITION OF public.orders FOR VALUES FROM (MINVALUE) TO (MAXVALUE)"
        )
    result, path = _load(make_spec(), src_url, dst_url)
    assert path == "staged" and result.inserted == 100


@pytest.mark.parametrize("newer", ["target", "source"])
def test_a_key_outside_the_range_rolls_the_copy_back_and_upserts_newer_wins(tables, pg, newer):
    """A time chunk checks its time range only: a row of the day's keys stored under another time (here
    moved to 2022) is still found, by the unique index, and newer-wins decides as on the staging path."""
    src, dst = tables
    (first_id,) = fetch_all(src, "SELECT min(id) FROM orders WHERE created_at >= %s", (CHUNK.start,))[0]
    row = fetch_all(
        src, "SELECT id, customer_id, status, amount, updated_at, note FROM orders WHERE id = %s", (first_id,)
    )
    (rid, cust, status, amount, updated, note) = row[0]
    updated = updated + (dt.timedelta(days=1) if newer == "target" else -dt.timedelta(days=1))
    with pg(dst).cursor() as cur:
        cur.execute(
            "INSERT INTO public.orders VALUES (%s, %s, 'moved', %s, '2022-06-01 00:00+00', %s, %s)",
            (rid, cust, amount, updated, note),
        )
    result, path = _load(make_spec(), src, dst)
    assert path == "both"  # tried the COPY, rolled back, staged
    if newer == "target":  # the target's row is newer: kept
        assert (result.inserted, result.updated, result.unchanged) == (99, 0, 1)
        assert fetch_all(dst, "SELECT status FROM public.orders WHERE id = %s", (rid,)) == [("moved",)]
    else:  # the source's row is newer: it replaces the target's
        assert (result.inserted, result.updated, result.unchanged) == (99, 1, 0)
        assert fetch_all(dst, "SELECT status FROM public.orders WHERE id = %s", (rid,)) == [(status,)]
    assert fetch_all(dst, "SELECT count(*) FROM public.orders") == [(100,)]
    (ledger,) = fetch_all(dst, "SELECT rows_inserted, rows_updated FROM public.backfill_ledger")
    assert ledger == (result.inserted, result.updated)  # the rolled-back COPY's rows are not counted


def test_key_ranges_check_their_key_range(tables, pg):
    src, dst = tables
    spec = make_spec(chunk_by="key")
    lo_chunk = Chunk("id 1..101", pendulum.datetime(2023, 1, 1), pendulum.datetime(2023, 1, 4), "id", None, 101)
    hi_chunk = Chunk("id 101..", pendulum.datetime(2023, 1, 1), pendulum.datetime(2023, 1, 4), "id", 101, None)
    result, path = _load(spec, src, dst, lo_chunk)
    assert path == "direct" and result.inserted == 100
    result, path = _load(spec, src, dst, hi_chunk)  # the other range is still empty: direct too
    assert path == "direct" and result.inserted == 200
    result, path = _load(spec, src, dst, lo_chunk)
    assert path == "staged" and result.unchanged == 100


_LOCAL = {  # the time column's type -> how a local wall-clock time is written into it (%s: 'YYYY-MM-DD HH:MM:SS')
    "timestamptz": "(%s::timestamp AT TIME ZONE current_setting('TimeZone'))",
    "timestamp": "%s::timestamp",
    "date": "%s::timestamp::date",
}


@pytest.mark.parametrize("tz", ["America/New_York", "Asia/Kolkata", "UTC"])
@pytest.mark.parametrize("kind", ["timestamptz", "timestamp", "date"])
def test_the_emptiness_check_follows_the_local_day_of_each_time_type(src_url, dst_url, pg, kind, tz):
    """A row of a neighbouring local day leaves the range empty (straight in); one inside it does not (staged).

    Both sides hold the time column as ``kind`` (a plain COPY needs no cast), read in the spec's timezone.
    """
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2023, 1, 1))
    create_orders(pg(dst_url))
    local = "(created_at AT TIME ZONE %(tz)s)"
    to_kind = {"timestamptz": "created_at", "timestamp": local, "date": f"{local}::date"}[kind]
    for url in (src_url, dst_url):
        with pg(url).cursor() as cur:
            cur.execute(f"ALTER TABLE orders ALTER COLUMN created_at TYPE {kind} USING {to_kind}", {"tz": tz})
    with pg(dst_url).cursor() as cur:
        cur.execute("CREATE INDEX ON public.orders (created_at)")
        cur.execute(f"SET TimeZone = '{tz}'")
        # other keys at the last second before the local day and at its end: outside its range
        for key, at in ((90_001, "2023-01-01 23:59:59"), (90_002, "2023-01-03 00:00:00")):
            cur.execute(
                f"INSERT INTO orders (id, customer_id, status, amount, created_at, updated_at)"
                f" VALUES (%s, 1, 'new', 1, {_LOCAL[kind]}, now())",
                (key, at),
            )
    pg(dst_url).commit()
    spec = make_spec(timezone=tz)
    day = pendulum.datetime(2023, 1, 2, tz=tz)
    chunk = Chunk("2023-01-02", day, day.add(days=1))
    result, path = _load(spec, src_url, dst_url, chunk)
    assert path == "direct", "a neighbouring local day's rows made the range look taken"
    if kind == "date":
        in_day, bounds = "created_at = %s", (day.date(),)
    else:  # a timestamp holds local wall-clock times; a timestamptz compares as instants
        lo, hi = (day.naive(), day.add(days=1).naive()) if kind == "timestamp" else (day, day.add(days=1))
        in_day, bounds = "created_at >= %s AND created_at < %s", (lo, hi)
    source_rows = fetch_all(src_url, f"SELECT {COLUMNS} FROM orders WHERE {in_day} ORDER BY id", bounds)
    assert source_rows and result.inserted == len(source_rows)
    assert fetch_all(dst_url, f"SELECT {COLUMNS} FROM orders WHERE id < 90000 ORDER BY id") == source_rows

    # the next local day holds a row of another key (90_002 at its first instant): that range is not empty
    nxt = Chunk("2023-01-03", day.add(days=1), day.add(days=2))
    again, path = _load(spec, src_url, dst_url, nxt)
    assert path == "staged", "a row inside the local day was missed by the emptiness check"
    assert again.inserted > 0 and again.updated == 0
