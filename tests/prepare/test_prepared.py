"""The prepared run (prepare/facts.py): made once by the plan, checked by each chunk with one fingerprint statement
per side, on real PostgreSQL.

The promise: a prepared run only ever skips work. Every change between the plan and a chunk that could
change what the chunk selects, how it casts or writes, or which backfill it records itself under (a table
re-created, a column added, dropped, renamed or retyped, a unique key changed) makes the chunk prepare again
from the catalogs, so it loads exactly what a chunk prepared from scratch loads; harmless events (ANALYZE,
writes, a non-unique index) keep the prepared run in use.
"""

from __future__ import annotations

import datetime as dt
import json

import pendulum
import psycopg2
import psycopg2.extensions
import pytest

from airflow_backfill_provider.prepare import facts, identity
from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.connections import open_destination, open_source
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.transfer.chunk import Sessions, transfer_chunk
from tests.conftest import fetch_all
from tests.seed import ORDERS_SPEC, create_orders, seed_orders

DAY = pendulum.datetime(2023, 1, 2)


def _spec(**over):
    return load_spec({**ORDERS_SPEC, "source_conn_id": "unused", "destination_conn_id": "unused", **over})


def _chunk(day=DAY):
    return Chunk(day.to_date_string(), day, day.add(days=1))


def _plan(spec, src, dst, chunk) -> facts.PreparedRun:
    """What the plan task hands a chunk, through JSON as XCom stores it."""
    s, d = psycopg2.connect(src), psycopg2.connect(dst)
    try:
        prepared = facts.prepare_run(spec, s, d, [chunk], source_conn_id=src)
    finally:
        s.close()
        d.close()
    carried = json.loads(json.dumps(prepared.attach([chunk.to_descriptor()])))[0]
    again = facts.PreparedRun.of_descriptor(carried)
    assert again is not None
    return again


class _Recording(psycopg2.extensions.cursor):
    """Records every statement a session runs (the SQL the server received)."""

    def execute(self, query, vars=None):
        self.connection.statements.append(self.mogrify(query, vars).decode())
        return super().execute(query, vars)


def _sessions(spec, src, dst):
    s = open_source(spec, "backfill:test:prepared", src)
    d = open_destination(spec, "backfill:test:prepared", dst)
    for conn in (s, d):
        conn.statements = []
        conn.cursor_factory = _Recording
    return s, d


def _load(spec, src, dst, chunk, prepared):
    """One chunk on recorded sessions: (result, source statements, destination statements)."""
    s, d = _sessions(spec, src, dst)
    try:
        result = transfer_chunk(spec, chunk, sessions=Sessions(s, d), prepared=prepared, source=src)
        return result, s.statements, d.statements
    finally:
        s.close()
        d.close()


def _dest(dst, columns="id, customer_id, status, amount::text, created_at, updated_at, note"):
    return fetch_all(dst, f"SELECT {columns} FROM public.orders ORDER BY id")


def _ledger_keys(dst):
    return fetch_all(dst, "SELECT DISTINCT backfill_key FROM backfill_ledger")


def _identity_now(spec, src, dst):
    s, d = psycopg2.connect(src), psycopg2.connect(dst)
    try:
        return identity.of(spec, s, d, source_conn_id=src)
    finally:
        s.close()
        d.close()


@pytest.fixture()
def tables(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2023, 1, 1))
    create_orders(pg(dst_url))
    with pg(dst_url).cursor() as cur:  # a column the source does not have (yet): loaded as NULL
        cur.execute("ALTER TABLE public.orders ADD COLUMN channel text")
    return src_url, dst_url


def test_a_chunk_with_the_prepared_run_checks_one_fingerprint_per_side_and_loads_the_same(tables, pg):
    src, dst = tables
    spec, chunk = _spec(), _chunk()
    prepared = _plan(spec, src, dst, chunk)
    result, src_sql, dst_sql = _load(spec, src, dst, chunk, prepared)
    assert result.rows_extracted == result.inserted == 100
    assert _catalog_reads_of(src_sql) == [] and _catalog_reads_of(dst_sql) == []
    assert len(_fingerprints_of(src_sql)) == 1 and len(_fingerprints_of(dst_sql)) == 1
    assert _ledger_keys(dst) == [(prepared.backfill.key,)]
    carried_rows = _dest(dst)
    with pg(dst).cursor() as cur:
        cur.execute("TRUNCATE public.orders; TRUNCATE public.backfill_ledger")
    result, src_sql, dst_sql = _load(spec, src, dst, chunk, None)  # a chunk run alone prepares itself
    assert _catalog_reads_of(src_sql) and _catalog_reads_of(dst_sql)
    assert result.inserted == 100 and _dest(dst) == carried_rows
    assert _ledger_keys(dst) == [(prepared.backfill.key,)]  # the same backfill, however it was prepared
    # and what was loaded is the source's day
    assert carried_rows == fetch_all(
        src,
        "SELECT id, customer_id, status, amount::text, created_at, updated_at, note FROM orders "
        "WHERE created_at >= %s AND created_at < %s ORDER BY id",
        (chunk.start, chunk.end),
    )


def _catalog_reads_of(statements):
    return [q for q in statements if "format_type" in q or "WITH RECURSIVE" in q or "format('%I.%I'" in q]


def _fingerprints_of(statements):
    return [q for q in statements if "md5(concat_ws" in q]


# (side, DDL) after the plan: each changes what a chunk must select, cast or check, or which table it writes
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
        "ALTER TABLE orders RENAME TO orders_old; CREATE TABLE orders (LIKE orders_old INCLUDING ALL); "
        "INSERT INTO orders SELECT * FROM orders_old",
    ),
    "source collation": ("src", 'ALTER TABLE orders ALTER COLUMN status TYPE text COLLATE "C"'),
    "destination column added": ("dst", "ALTER TABLE public.orders ADD COLUMN region text"),
    "destination column retyped (another cast)": (
        "dst",
        "ALTER TABLE public.orders ALTER COLUMN amount TYPE numeric(12,1)",
    ),
    "destination typmod": ("dst", "ALTER TABLE public.orders ALTER COLUMN note TYPE varchar(400)"),
    "destination not null set": ("dst", "ALTER TABLE public.orders ALTER COLUMN note SET NOT NULL"),
    "destination key deferrable": (
        "dst",
        "ALTER TABLE public.orders DROP CONSTRAINT orders_pkey, ADD PRIMARY KEY (id) DEFERRABLE",
    ),
    "destination key replaced": (
        "dst",
        "ALTER TABLE public.orders DROP CONSTRAINT orders_pkey; "
        "CREATE UNIQUE INDEX orders_id_key ON public.orders (id) WHERE id > 0; "
        "ALTER TABLE public.orders ALTER COLUMN id DROP NOT NULL",
    ),
    "destination re-created": (
        "dst",
        "ALTER TABLE public.orders RENAME TO orders_old; "
        "CREATE TABLE public.orders (LIKE public.orders_old INCLUDING ALL)",
    ),
}


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_table_altered_between_plan_and_chunk_makes_the_chunk_prepare_again(tables, pg, change, timezone):
    src, dst = tables
    spec, chunk = _spec(timezone=timezone), _chunk(pendulum.datetime(2023, 1, 2, tz=timezone))
    prepared = _plan(spec, src, dst, chunk)
    side, ddl = CHANGES[change]
    with pg(src if side == "src" else dst).cursor() as cur:
        cur.execute(ddl)
    # the chunk with the stale prepared run does exactly what a chunk without one does (succeeds or fails alike)
    outcomes = []
    for carried in (prepared, None):
        with pg(dst).cursor() as cur:
            cur.execute("TRUNCATE public.orders; DROP TABLE IF EXISTS public.backfill_ledger")
        try:
            result, src_sql, dst_sql = _load(spec, src, dst, chunk, carried)
            assert _catalog_reads_of(src_sql) and _catalog_reads_of(dst_sql)  # prepared again
            outcomes.append(("ok", result.inserted, _dest(dst, "*"), _ledger_keys(dst)))
        except Exception as err:  # noqa: BLE001 - compared below
            outcomes.append(("error", type(err).__name__, str(err).split("\n")[0]))
    assert outcomes[0] == outcomes[1]
    if outcomes[0][0] == "ok" and side == "dst":
        # recorded under the backfill as it is now (a re-created table is another table), not the plan's
        now = _identity_now(spec, src, dst)
        assert outcomes[0][3] == [(now.key,)] and now.key != prepared.backfill.key


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
def test_harmless_events_keep_the_prepared_run(tables, pg, event):
    src, dst = tables
    spec, chunk = _spec(), _chunk()
    prepared = _plan(spec, src, dst, chunk)
    for url in (src, dst):
        with pg(url).cursor() as cur:
            cur.execute(event.replace("orders", "public.orders"))
    result, src_sql, dst_sql = _load(spec, src, dst, chunk, prepared)
    assert _catalog_reads_of(src_sql) == [] and _catalog_reads_of(dst_sql) == [] and result.inserted == 100


def test_a_missing_ledger_is_made_by_the_chunk_without_preparing_again(tables, pg):
    src, dst = tables
    spec, chunk = _spec(), _chunk()
    prepared = _plan(spec, src, dst, chunk)  # the plan writes no ledger
    assert fetch_all(dst, "SELECT to_regclass('public.backfill_ledger')") == [(None,)]
    result, src_sql, dst_sql = _load(spec, src, dst, chunk, prepared)
    assert result.inserted == 100 and _catalog_reads_of(dst_sql) == []
    assert _ledger_keys(dst) == [(prepared.backfill.key,)]


def test_user_defined_types_read_their_column_plan_again(src_url, dst_url, pg):
    """A domain (or enum, composite) can change without touching the table's catalog rows: its column plan
    is never carried (the identity still is, after the fingerprint check)."""
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2023, 1, 1))
    with pg(dst_url).cursor() as cur:
        cur.execute("CREATE DOMAIN short_note AS text CHECK (length(VALUE) < 100)")
    create_orders(pg(dst_url))
    with pg(dst_url).cursor() as cur:
        cur.execute("ALTER TABLE public.orders ALTER COLUMN note TYPE short_note")
    spec, chunk = _spec(), _chunk()
    prepared = _plan(spec, src_url, dst_url, chunk)
    assert not prepared.ranges["None"].carriable
    result, src_sql, dst_sql = _load(spec, src_url, dst_url, chunk, prepared)
    assert result.inserted == 100 and _catalog_reads_of(src_sql) and _catalog_reads_of(dst_sql)


def test_a_prepared_run_is_ignored_for_another_spec_or_release(tables):
    src, dst = tables
    spec, chunk = _spec(), _chunk()
    prepared = _plan(spec, src, dst, chunk)
    carried = prepared.to_json()
    assert facts.PreparedRun.from_json(carried) == prepared
    assert facts.PreparedRun.from_json({**carried, "v": facts.VERSION + 1}) is None
    assert facts.PreparedRun.from_json({**carried, "ranges": {"None": {"junk": 1}}}) is None
    assert facts.PreparedRun.from_json(None) is None and facts.PreparedRun.from_json("x") is None
    other = _spec(version_column=None)  # the spec changed since the plan: prepared from the catalogs
    result, src_sql, dst_sql = _load(other, src, dst, chunk, prepared)
    assert result.inserted == 100 and _catalog_reads_of(src_sql) and _catalog_reads_of(dst_sql)


def test_swap_mode_checks_the_live_table_too(tables, pg):
    """In swap mode the chunks write the parallel table, and the identity describes the live one: a change
    of either makes the chunk prepare again."""
    src, dst = tables
    spec, chunk = _spec(mode="swap"), _chunk()
    prepared = _plan(spec, src, dst, chunk)
    assert fetch_all(dst, "SELECT to_regclass('public.orders_backfill') IS NOT NULL") == [(True,)]  # plan made it
    result, src_sql, dst_sql = _load(spec, src, dst, chunk, prepared)
    assert result.inserted == 100 and _catalog_reads_of(dst_sql) == []
    with pg(dst).cursor() as cur:
        cur.execute("ALTER TABLE public.orders ADD COLUMN region text")
    result, src_sql, dst_sql = _load(spec, src, dst, chunk, prepared)
    assert _catalog_reads_of(dst_sql) and result.unchanged == 100
    assert set(_ledger_keys(dst)) == {(prepared.backfill.key,), (_identity_now(spec, src, dst).key,)}
