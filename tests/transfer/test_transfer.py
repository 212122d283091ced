"""The chunk path against real PostgreSQL: first load, idempotent rerun, newer wins, atomic failure."""

import datetime as dt
import time

import psycopg2
import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all, table_digest
from tests.specs import make_spec


@pytest.fixture()
def seeded(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=6000, days=6, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    return src_url, dst_url


def days(start="2024-01-01", end="2024-01-07"):
    return plan_chunks(start, end, "day", "UTC")


def wait_chunk_sessions_gone(url, timeout: float = 30) -> None:
    """Until no chunk session is left: an exiting backend flushes its pending table statistics first
    (before_shmem_exit), so after this the pg_stat counters include every chunk's writes."""
    deadline = time.monotonic() + timeout
    while fetch_all(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'backfill:%%'",
    ) != [(0,)]:
        assert time.monotonic() < deadline, f"chunk sessions still open after {timeout}s"
        time.sleep(0.02)


def tuple_stats(url):
    """n_tup_upd/n_tup_ins for orders, after forcing this backend's stats to be flushed."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_stat_force_next_flush()")
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables WHERE relname = 'orders'")
        row = cur.fetchone()
    conn.close()
    return row


def test_first_load_moves_exactly_the_source_rows(seeded):
    src, dst = seeded
    spec = make_spec(src, dst)
    results = [transfer_chunk(spec, c) for c in days()]
    assert sum(r.rows_extracted for r in results) == 6000
    assert sum(r.inserted for r in results) == 6000
    assert all(r.updated == 0 and r.unchanged == 0 for r in results)
    assert table_digest(src) == table_digest(dst)
    ledger = fetch_all(dst, "SELECT chunk_id, rows_extracted, rows_inserted FROM backfill_ledger ORDER BY range_start")
    assert [r[0] for r in ledger] == [c.chunk_id for c in days()]
    assert sum(r[1] for r in ledger) == 6000


def test_rerun_rewrites_zero_rows(seeded):
    src, dst = seeded
    spec = make_spec(src, dst)
    for c in days():
        transfer_chunk(spec, c)
    xmins_before = fetch_all(dst, "SELECT id, xmin::text FROM orders ORDER BY id")
    wait_chunk_sessions_gone(dst)  # a backend flushes its table stats when it exits
    stats_before = tuple_stats(dst)
    results = [transfer_chunk(spec, c) for c in days()]
    assert sum(r.unchanged for r in results) == 6000
    assert sum(r.inserted + r.updated for r in results) == 0
    assert fetch_all(dst, "SELECT id, xmin::text FROM orders ORDER BY id") == xmins_before  # no row rewritten
    wait_chunk_sessions_gone(dst)
    stats_after = tuple_stats(dst)
    assert stats_after[1] == stats_before[1], "n_tup_upd grew on a rerun"


def test_older_source_row_never_overwrites_newer_destination_row(seeded, pg):
    src, dst = seeded
    spec = make_spec(src, dst)
    chunk = days()[0]
    transfer_chunk(spec, chunk)
    d = pg(dst).cursor()
    # live ingest wrote a newer version of order 5 in the destination
    d.execute("UPDATE orders SET status = 'live-newer', updated_at = updated_at + interval '1 day' WHERE id = 5")
    # and the source changed order 6 (newer) and order 7 (same version, different content)
    s = pg(src).cursor()
    s.execute("UPDATE orders SET status = 'src-newer', updated_at = updated_at + interval '1 hour' WHERE id = 6")
    s.execute("UPDATE orders SET note = 'same-version-fix' WHERE id = 7")
    result = transfer_chunk(spec, chunk)
    assert result.updated == 2 and result.inserted == 0
    rows = dict(fetch_all(dst, "SELECT id, status FROM orders WHERE id IN (5, 6)"))
    assert rows == {5: "live-newer", 6: "src-newer"}
    assert fetch_all(dst, "SELECT note FROM orders WHERE id = 7") == [("same-version-fix",)]


def test_failure_midway_leaves_no_rows_and_no_ledger_entry(seeded, pg):
    src, dst = seeded
    spec = make_spec(src, dst)
    chunk = days()[1]
    # the destination rejects one row of the chunk during the upsert (after COPY into staging succeeded)
    bad_id = fetch_all(
        src, "SELECT max(id) FROM orders WHERE created_at >= %s AND created_at < %s", (chunk.start, chunk.end)
    )[0][0]
    pg(dst).cursor().execute(
        f"""CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.id = {int(bad_id)} THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$;
            CREATE TRIGGER boom BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION boom();"""
    )
    with pytest.raises(Exception, match="injected failure"):
        transfer_chunk(spec, chunk)
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(0,)]
    assert fetch_all(dst, "SELECT count(*) FROM backfill_ledger") == [(0,)]
    pg(dst).cursor().execute("DROP TRIGGER boom ON orders")
    assert transfer_chunk(spec, chunk).inserted == 1000


def test_permanent_errors_say_what_to_fix(seeded, pg):
    src, dst = seeded
    chunk = days()[0]
    with pytest.raises(PermanentChunkError, match="source table 'nope' does not exist"):
        transfer_chunk(make_spec(src, dst).model_copy(update={"source_table": "nope"}), chunk)
    with pytest.raises(PermanentChunkError, match=r"no column\(s\) \['shipped_at'\]"):
        transfer_chunk(make_spec(src, dst, columns=["id", "created_at", "updated_at", "shipped_at"]), chunk)
    pg(dst).cursor().execute("CREATE TABLE nokey (LIKE orders)")
    with pytest.raises(PermanentChunkError, match="no unique constraint"):
        transfer_chunk(make_spec(src, dst).model_copy(update={"destination_table": "nokey"}), chunk)
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(0,)]


def test_destination_columns_are_the_truth(seeded, pg):
    src, dst = seeded
    d = pg(dst).cursor()
    d.execute("ALTER TABLE orders ADD COLUMN channel text, ALTER COLUMN customer_id TYPE bigint")
    pg(src).cursor().execute("ALTER TABLE orders ADD COLUMN legacy_flag boolean")
    result = transfer_chunk(make_spec(src, dst), days()[0])
    assert result.inserted == 1000
    assert "channel: missing in source, loaded as NULL::text" in result.decisions
    assert any("legacy_flag" in d for d in result.decisions)
    assert fetch_all(dst, "SELECT count(*) FROM orders WHERE channel IS NULL") == [(1000,)]


def test_text_copy_format_gives_the_same_result(seeded):
    src, dst = seeded
    spec = make_spec(src, dst, copy_format="text")
    for c in days():
        transfer_chunk(spec, c)
    assert table_digest(src) == table_digest(dst)


def test_without_version_column_live_wins_by_default(seeded, pg):
    src, dst = seeded
    spec = make_spec(src, dst, version_column=None)
    chunk = days()[0]
    transfer_chunk(spec, chunk)
    pg(dst).cursor().execute("UPDATE orders SET status = 'live' WHERE id = 1")
    pg(src).cursor().execute("UPDATE orders SET status = 'backfill' WHERE id = 1")
    transfer_chunk(spec, chunk)
    assert fetch_all(dst, "SELECT status FROM orders WHERE id = 1") == [("live",)]
    overwrite = load_spec({**spec.model_dump(), "conflict_policy": "backfill_wins"})
    assert transfer_chunk(overwrite, chunk).updated == 1
    assert fetch_all(dst, "SELECT status FROM orders WHERE id = 1") == [("backfill",)]


def test_counts_are_exact_on_a_partitioned_destination(seeded, pg):
    """Inserted/updated come from the transaction's per-table counters: summed over the partitions."""
    src, dst = seeded
    d = pg(dst)
    with d.cursor() as cur:
        cur.execute("DROP TABLE orders")
        cur.execute(
            "CREATE TABLE orders (id bigint, customer_id integer NOT NULL, status text NOT NULL,"
            " amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,"
            " note text, PRIMARY KEY (id)) PARTITION BY RANGE (id)"
        )
        cur.execute("CREATE TABLE orders_lo PARTITION OF orders FOR VALUES FROM (MINVALUE) TO (500)")
        cur.execute("CREATE TABLE orders_hi PARTITION OF orders FOR VALUES FROM (500) TO (MAXVALUE)")
    spec = make_spec(src, dst)
    chunk = days()[0]  # ids 1..1000: both partitions
    first = transfer_chunk(spec, chunk)
    assert (first.inserted, first.updated, first.unchanged) == (1000, 0, 0)
    s = pg(src)
    with s.cursor() as cur:  # one newer row in each partition
        cur.execute(
            "UPDATE orders SET status = 'changed', updated_at = updated_at + interval '1 minute' WHERE id IN (7, 700)"
        )
    again = transfer_chunk(spec, chunk)
    assert (again.inserted, again.updated, again.unchanged) == (0, 2, 998)
    assert fetch_all(dst, "SELECT id, status FROM orders WHERE status = 'changed' ORDER BY id") == [
        (7, "changed"),
        (700, "changed"),
    ]
