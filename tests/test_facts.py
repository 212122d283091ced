"""Catalog facts read once by the plan and re-used by chunks (facts.py), on real PostgreSQL.

The promise: carried facts only ever skip catalog reads. Every schema change between the plan and a
chunk that could change what the chunk selects or how it writes makes the chunk read the catalogs
again, so it loads exactly what a chunk planned from scratch loads; harmless events (ANALYZE, writes,
a non-unique index) keep the carried facts in use.
"""

from __future__ import annotations

import datetime as dt
import json

import pendulum
import psycopg2
import psycopg2.extensions
import pytest

from airflow_backfill_provider import facts, identity, planning
from airflow_backfill_provider.chunks import Chunk
from airflow_backfill_provider.connections import open_destination, open_source
from airflow_backfill_provider.spec import TableName
from airflow_backfill_provider.transfer import transfer_chunk
from tests.conftest import fetch_all
from tests.seed import create_orders, seed_orders
from tests.specs import make_spec

DAY = pendulum.datetime(2023, 1, 2)


def _chunk(day=DAY):
    return Chunk(day.to_date_string(), day, day.add(days=1))


def _plan_carry(spec, src, dst, chunk):
    """What the plan task hands a chunk: the identity and the catalog, through JSON as XCom stores them."""
    s, d = psycopg2.connect(src), psycopg2.connect(dst)
    try:
        per_range: dict = {}
        planning.preflight(spec, planning.Plan(chunk.start, chunk.end, "day", [chunk]), s, d, carry=per_range)
        backfill = identity.of(spec, s, d, source_conn_id=src)
    finally:
        s.close()
        d.close()
    return backfill, json.loads(json.dumps(facts.carry(spec, per_range)))


class _Recording(psycopg2.extensions.cursor):
    """Records every statement a session runs (the SQL the server received)."""

    def execute(self, query, vars=None):
        self.connection.statements.append(self.mogrify(query, vars).decode())
        return super().execute(query, vars)


def _sessions(spec, src, dst):
    s = open_source(spec, "backfill:test:facts", src)
    d = open_destination(spec, "backfill:test:facts", dst)
    for conn in (s, d):
        conn.statements = []
        conn.cursor_factory = _Recording
    return s, d


def _catalog_reads(conn) -> list[str]:
    # describe_table (format_type) and describe_types (WITH RECURSIVE): the reads carried facts skip
    return [q for q in conn.statements if "format_type" in q or "WITH RECURSIVE" in q]


def _load(spec, src, dst, chunk, backfill, catalog):
    """One chunk on recorded sessions: (result, catalog statements on source, on destination)."""
    s, d = _sessions(spec, src, dst)
    result = transfer_chunk(
        spec, chunk, source_conn=s, destination_conn=d, backfill=backfill, catalog=catalog, close=False
    )
    reads = (_catalog_reads(s), _catalog_reads(d))
    s.close()
    d.close()
    return result, reads


def _dest(dst, columns="id, customer_id, status, amount::text, created_at, updated_at, note"):
    return fetch_all(dst, f"SELECT {columns} FROM public.orders ORDER BY id")


@pytest.fixture()
def tables(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2023, 1, 1))
    create_orders(pg(dst_url))
    with pg(dst_url).cursor() as cur:  # a column the source does not have (yet): loaded as NULL
        cur.execute("ALTER TABLE public.orders ADD COLUMN channel text")
    return src_url, dst_url


def test_a_chunk_with_the_plans_catalog_reads_no_catalog_and_loads_the_same(tables, pg):
    src, dst = tables
    spec, chunk = make_spec(), _chunk()
    backfill, catalog = _plan_carry(spec, src, dst, chunk)
    assert set(catalog["ranges"]) == {"None"}  # the current source table's range
    result, (src_reads, dst_reads) = _load(spec, src, dst, chunk, backfill, catalog)
    assert result.rows_extracted == result.inserted == 100
    assert src_reads == [] and dst_reads == []
    carried_rows = _dest(dst)
    with pg(dst).cursor() as cur:
        cur.execute("TRUNCATE public.orders; TRUNCATE public.backfill_ledger")
    result, (src_reads, dst_reads) = _load(spec, src, dst, chunk, backfill, None)  # read as before
    assert src_reads and dst_reads
    assert result.inserted == 100 and _dest(dst) == carried_rows
    # and what was loaded is the source's day
    assert carried_rows == fetch_all(
        src,
        "SELECT id, customer_id, status, amount::text, created_at, updated_at, note FROM orders "
        "WHERE created_at >= %s AND created_at < %s ORDER BY id",
        (chunk.start, chunk.end),
    )


# (side, DDL) after the plan: each changes what a chunk must select, cast or check
CHANGES = {
    "source column added": ("src", "ALTER TABLE orders ADD COLUMN channel text DEFAULT 'web'"),
    "source column dropped": ("src", "ALTER TABLE orders DROP COLUMN note"),
    "source column renamed": ("src", "ALTER TABLE orders RENAME COLUMN note TO remark"),
    "source type widened": ("src", "ALTER TABLE orders ALTER COLUMN amount TYPE numeric(14,4)"),
    "source time type": (
        "src",
        "ALTER TABLE orders ALTER COLUMN created_at TYPE timestamp USING created_at AT TIME ZONE 'UTC'",
    ),
    "source re-created": (
        "src",
        "ALTER TABLE orders RENAME TO orders_old; CREATE TABLE orders (LIKE orders_old INCLUDING ALL); INSERT INTO orders SELECT * FROM orders_old",
    ),
    "source collation": ("src", 'ALTER TABLE orders ALTER COLUMN status TYPE text COLLATE "C"'),
    "destination column added": ("dst", "ALTER TABLE public.orders ADD COLUMN region text"),
    "destination typmod": ("dst", "ALTER TABLE public.orders ALTER COLUMN note TYPE varchar(400)"),
    "destination not null set": ("dst", "ALTER TABLE public.orders ALTER COLUMN note SET NOT NULL"),
    "destination key deferrable": (
        "dst",
        "ALTER TABLE public.orders DROP CONSTRAINT orders_pkey, ADD PRIMARY KEY (id) DEFERRABLE",
    ),
    "destination key replaced": (
        "dst",
        "ALTER TABLE public.orders DROP CONSTRAINT orders_pkey; CREATE UNIQUE INDEX orders_id_key ON public.orders (id) WHERE id > 0; ALTER TABLE public.orders ALTER COLUMN id DROP NOT NULL",
    ),
}


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_schema_change_after_the_plan_makes_the_chunk_read_the_catalogs(tables, pg, change, timezone):
    src, dst = tables
    spec, chunk = make_spec(timezone=timezone), _chunk(pendulum.datetime(2023, 1, 2, tz=timezone))
    backfill, catalog = _plan_carry(spec, src, dst, chunk)
    side, ddl = CHANGES[change]
    with pg(src if side == "src" else dst).cursor() as cur:
        cur.execute(ddl)
    s, d = _sessions(spec, src, dst)
    try:
        same, _ = facts.verify(
            facts.usable(spec, chunk, catalog),
            s,
            d,
            spec.source,
            spec.staging_target,
            TableName.parse(spec.ledger_table),
        )
        assert not same
    finally:
        s.close()
        d.close()
    # the chunk with the stale catalog does exactly what a chunk without it does (succeeds or fails alike)
    outcomes = []
    for carried in (catalog, None):
        with pg(dst).cursor() as cur:
            cur.execute("TRUNCATE public.orders")
        try:
            result, (src_reads, dst_reads) = _load(spec, src, dst, chunk, backfill, carried)
            assert src_reads and dst_reads  # read again
            outcomes.append(("ok", result.inserted, _dest(dst, "*")))
        except Exception as err:  # noqa: BLE001 - compared below
            outcomes.append(("error", type(err).__name__, str(err).split("\n")[0]))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize(
    "event",
    [
        "ANALYZE orders",
        "VACUUM orders",
        "UPDATE orders SET note = 'x' WHERE id < 10",
        "CREATE INDEX ON orders (customer_id)",
        "ALTER TABLE orders SET (fillfactor = 90)",
    ],
)
def test_harmless_events_keep_the_carried_catalog(tables, pg, event):
    src, dst = tables
    spec, chunk = make_spec(), _chunk()
    backfill, catalog = _plan_carry(spec, src, dst, chunk)
    for url in (src, dst):
        with pg(url).cursor() as cur:
            cur.execute(event.replace("orders", "public.orders"))
    result, (src_reads, dst_reads) = _load(spec, src, dst, chunk, backfill, catalog)
    assert src_reads == [] and dst_reads == [] and result.inserted == 100


def test_user_defined_types_are_never_carried(src_url, dst_url, pg):
    """A domain (or enum, composite) can change without touching the table's catalog rows."""
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2023, 1, 1))
    with pg(dst_url).cursor() as cur:
        cur.execute("CREATE DOMAIN short_note AS text CHECK (length(VALUE) < 100)")
    create_orders(pg(dst_url))
    with pg(dst_url).cursor() as cur:
        cur.execute("ALTER TABLE public.orders ALTER COLUMN note TYPE short_note")
    spec, chunk = make_spec(), _chunk()
    backfill, catalog = _plan_carry(spec, src_url, dst_url, chunk)
    assert catalog == {}
    result, (src_reads, dst_reads) = _load(spec, src_url, dst_url, chunk, backfill, catalog)
    assert result.inserted == 100 and src_reads and dst_reads


def test_carried_facts_are_ignored_for_another_spec_or_range(tables):
    src, dst = tables
    spec, chunk = make_spec(), _chunk()
    _, catalog = _plan_carry(spec, src, dst, chunk)
    assert facts.usable(spec, chunk, catalog) is not None
    assert facts.usable(make_spec(version_column=None), chunk, catalog) is None  # the spec changed since the plan
    assert facts.usable(spec, chunk, {"spec": catalog["spec"], "ranges": {"0": catalog["ranges"]["None"]}}) is None
    assert facts.usable(spec, chunk, {"spec": catalog["spec"], "ranges": {"None": {"junk": 1}}}) is None
    assert facts.usable(spec, chunk, None) is None and facts.usable(spec, chunk, "x") is None  # type: ignore[arg-type]


def test_facts_survive_json(tables):
    src, dst = tables
    spec, chunk = make_spec(), _chunk()
    s, d = psycopg2.connect(src), psycopg2.connect(dst)
    try:
        read = facts.read(spec, s, d, chunk)
    finally:
        s.close()
        d.close()
    again = facts.Facts.from_json(json.loads(json.dumps(read.to_json())))
    assert again == read and read.carriable
    assert facts.plan_from(spec, again, chunk)[1].copy_exprs == facts.plan_from(spec, read, chunk)[1].copy_exprs
