"""Validation of a table not in time order reads it in slices of physical blocks, in one snapshot (validate.py).

One statement over a whole scattered table runs as long as the table is large: past ``statement_timeout``
on a big one. Slices keep each statement short; these tests check that the slices add up to exactly the
table: every block read once, rows committed after the slices were cut included, a difference in any slice
seen, rows an update moves counted once, and the same report as one statement.
"""

from __future__ import annotations

import threading

import pendulum
import pytest

from airflow_backfill_provider import validate
from airflow_backfill_provider.core.exceptions import ValidationTimeout
from airflow_backfill_provider.validate import FAIL, PASS, validate_range
from tests.validate.test_validate import ORDERS, make_spec

# rows in random time order over 10 days (time uncorrelated with the physical order)
FILL = """
INSERT INTO public.orders (id, created_at, updated_at, amount, qty, note)
SELECT g, timestamptz '2024-01-01 00:00+00' + ((g * 7919) %% 14400) * interval '1 minute',
       timestamptz '2024-01-01', round((g %% 997) * 1.25, 2), g %% 5, repeat('x', g %% 50)
FROM generate_series(%(first)s, %(last)s) AS g ORDER BY md5(g::text)
"""
START, END = pendulum.datetime(2024, 1, 1, tz="UTC"), pendulum.datetime(2024, 1, 11, tz="UTC")


@pytest.fixture()
def scattered(src_url, dst_url, pg):
    for url in (src_url, dst_url):
        with pg(url).cursor() as cur:
            cur.execute(ORDERS)
            cur.execute("ALTER TABLE public.orders ADD COLUMN note text")
            cur.execute(FILL, {"first": 1, "last": 3000})
            cur.execute("ANALYZE public.orders")
    return src_url, dst_url


def _run(src, dst):
    return validate_range(make_spec(), START, END, source=src, destination=dst, store=False)


def _figures(report):
    return [(d.day, d.source_rows, d.destination_rows, d.sums, d.checksum) for d in report.days]


def test_slices_read_exactly_the_table_and_agree_with_one_statement(scattered, monkeypatch):
    src, dst = scattered
    whole = _run(src, dst)
    assert any("one statement" in n for n in whole.notes), whole.notes
    monkeypatch.setattr(validate, "SLICE_ROWS", 200)  # ~15 slices of the 3,000 rows
    sliced = _run(src, dst)
    assert any("slices of its blocks" in n for n in sliced.notes), sliced.notes
    assert sliced.status == PASS and sum(d.source_rows for d in sliced.days) == 3000
    assert _figures(sliced) == _figures(whole)


def test_blocks_added_after_the_slices_were_cut_are_read_too(scattered, pg, monkeypatch):
    src, dst = scattered
    cut = validate.block_slices
    url = {pg(u).info.dbname: u for u in (src, dst)}

    def cut_then_grow(conn, table):
        slices = cut(conn, table)
        with pg(
            url[conn.info.dbname]
        ).cursor() as cur:  # rows committed between the cut and the read's snapshot: new blocks
            cur.execute(FILL, {"first": 3001, "last": 6000})
        return slices

    monkeypatch.setattr(validate, "block_slices", cut_then_grow)
    monkeypatch.setattr(validate, "SLICE_ROWS", 200)
    report = _run(src, dst)
    assert report.status == PASS
    assert sum(d.source_rows for d in report.days) == sum(d.destination_rows for d in report.days) == 6000


def test_a_difference_in_any_slice_is_seen(scattered, pg, monkeypatch):
    src, dst = scattered
    with pg(dst).cursor() as cur:  # one changed note, one lost row: in the middle of the table
        cur.execute("UPDATE public.orders SET note = note || '!' WHERE id = 1500 RETURNING created_at::date")
        changed = cur.fetchone()[0]
        cur.execute("DELETE FROM public.orders WHERE id = 2222 RETURNING created_at::date")
        lost = cur.fetchone()[0]
    monkeypatch.setattr(validate, "SLICE_ROWS", 200)
    report = _run(src, dst)
    failed = {d.day: d for d in report.days if d.status == FAIL}
    assert set(failed) == {changed, lost}, report.notes
    assert failed[lost].source_rows - failed[lost].destination_rows == 1
    assert failed[changed].checksum_differs


def test_rows_an_update_moves_between_slices_are_counted_once(scattered, pg, monkeypatch):
    """Slices share one snapshot: rows updated (moved to later blocks) after the first slice was read are
    neither counted twice nor lost, as they would be if each slice saw the latest committed data."""
    src, dst = scattered
    add = validate._add
    moved: list[int] = []

    def add_then_move(into, rows):
        add(into, rows)
        if threading.current_thread().name.startswith("validate-destination") and not moved:
            with pg(dst).cursor() as cur:  # the first slice's rows get new versions in later blocks
                cur.execute("UPDATE public.orders SET note = note WHERE ctid < '(1,0)'::tid")
                moved.append(cur.rowcount)

    monkeypatch.setattr(validate, "_add", add_then_move)
    monkeypatch.setattr(validate, "SLICE_ROWS", 200)
    report = _run(src, dst)
    assert moved and moved[0] > 0
    assert sum(d.destination_rows for d in report.days) == 3000, "a moved row was counted twice (or lost)"
    assert report.status == PASS


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_statement_past_statement_timeout_fails_naming_the_fix(scattered, pg, side):
    """A validation statement cut by statement_timeout_s would be cut again on a retry: a clear error instead."""
    src, dst = scattered
    with pg(src if side == "source" else dst).cursor() as cur:  # this side's read takes 3 s
        cur.execute("ALTER TABLE public.orders RENAME TO orders_data")
        cur.execute("CREATE VIEW public.orders AS SELECT o.* FROM orders_data o, (SELECT pg_sleep(3)) s")
    spec = make_spec(statement_timeout_s=0.5)
    with pytest.raises(ValidationTimeout) as raised:
        validate_range(spec, START, END, source=src, destination=dst, store=False)
    message = str(raised.value)
    assert f"on the {side} table 'public.orders'" in message and "statement_timeout_s (0.5 s)" in message
