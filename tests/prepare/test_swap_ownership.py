"""Swap mode only uses (and drops) a ``<table>_backfill`` it created itself (issue 12 item 12).

The provider marks every parallel table it creates (COMMENT ON TABLE); a DBA's own ``orders_backfill``
is refused by the plan, by every chunk and by the merge, before any write, and left untouched.
"""

import datetime as dt

import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.prepare.swap import MARKER, ensure_parallel_table, merge_parallel_table
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all
from tests.specs import make_spec

DAYS = plan_chunks("2024-01-01", "2024-01-04", "day", "UTC")
STATE = """SELECT (SELECT coalesce(string_agg(t::text || '/' || xmin::text, ',' ORDER BY id), '') FROM {t} t),
                  obj_description(to_regclass('{t}'), 'pg_class')"""


def spec_for(src, dst):
    """The destination unqualified, as the messages name it."""
    return make_spec(src, dst, name="orders_swap", mode="swap", destination_table="orders")


@pytest.fixture()
def world(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    return src_url, dst_url, spec_for(src_url, dst_url)


def snapshot(dst):
    return (
        fetch_all(dst, STATE.format(t="orders")),
        fetch_all(dst, STATE.format(t="orders_backfill")),
        fetch_all(dst, "SELECT to_regclass('backfill_ledger')"),
    )


ATTEMPTS = {
    "plan (create the parallel table)": lambda spec, dst, pg: ensure_parallel_table(pg(dst), spec),
    "chunk": lambda spec, dst, pg: transfer_chunk(spec, DAYS[0]),
    "merge": lambda spec, dst, pg: merge_parallel_table(spec),
}


@pytest.mark.parametrize("attempt", sorted(ATTEMPTS))
def test_a_dba_owned_parallel_table_is_refused_and_untouched(attempt, world, pg):
    src, dst, spec = world
    # the DBA's own table, same shape as the live one, with rows that must never reach orders
    create_orders(pg(dst), table="orders_backfill")
    pg(dst).cursor().execute(
        "INSERT INTO orders_backfill SELECT g, 1, 'dba', 1, now(), now(), NULL FROM generate_series(1, 50) g;"
        "COMMENT ON TABLE orders_backfill IS 'scratch copy, do not drop'"
    )
    before = snapshot(dst)
    with pytest.raises(PermanentChunkError) as info:
        ATTEMPTS[attempt](spec, dst, pg)
    for fragment in ("'orders_backfill' exists but was not created by this provider", "Nothing was written", "DROP"):
        assert fragment in str(info.value)
    assert snapshot(dst) == before  # live table, DBA table (rows, xmin, comment), no ledger table


def test_its_own_parallel_table_is_marked_and_merged(world):
    src, dst, spec = world
    for c in DAYS:
        transfer_chunk(spec, c)
    comment = fetch_all(dst, "SELECT obj_description('orders_backfill'::regclass, 'pg_class')")[0][0]
    assert comment.startswith(MARKER + "public.orders")
    result = merge_parallel_table(spec)
    assert result.merged and result.inserted == 300
    assert fetch_all(dst, "SELECT to_regclass('orders_backfill'), count(*) FROM orders") == [(None, 300)]
    assert fetch_all(dst, "SELECT count(*) FROM backfill_ledger") == [(0,)]  # its ledger rows went with it


def test_an_unmarked_parallel_table_of_the_previous_release_is_adopted(world, pg):
    """The previous release did not mark its parallel tables: ledger rows for the table prove it is ours."""
    src, dst, spec = world
    for c in DAYS[:2]:
        transfer_chunk(spec, c)
    pg(dst).cursor().execute(
        "COMMENT ON TABLE orders_backfill IS NULL;"  # as the previous release left it
        "UPDATE backfill_ledger SET target_table = 'orders_backfill', backfill_key = ''"
    )
    transfer_chunk(spec, DAYS[2])  # adopted and marked, not refused
    assert fetch_all(dst, "SELECT obj_description('orders_backfill'::regclass, 'pg_class')")[0][0].startswith(MARKER)
    result = merge_parallel_table(spec)
    assert result.merged and result.inserted == 300
    assert fetch_all(dst, "SELECT count(*) FROM backfill_ledger") == [(0,)]  # legacy and new rows forgotten
