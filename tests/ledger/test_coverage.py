"""Coverage of a chunk by the ledger's ranges (ledger/coverage.py), checked against brute force on a grid."""

from __future__ import annotations

import math

import pendulum
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.ledger.coverage import Coverage, Rect, merge, rect

# On a grid of integer coordinates the union of rectangles is a union of unit cells, so brute force is
# exact. Key bounds: finite ones in [0, 10]; -inf/+inf stand for an open side (a time chunk: all keys).
LO, HI = -1, 11


def _k(v):
    return LO if v == -math.inf else HI if v == math.inf else v


keys = st.one_of(st.just(None), st.integers(0, 10))


@st.composite
def rects(draw):
    t0 = draw(st.integers(0, 12))
    t1 = draw(st.integers(t0, 14))
    k0, k1 = draw(keys), draw(keys)
    if k0 is not None and k1 is not None and k1 < k0:
        k0, k1 = k1, k0
    return rect(t0, t1, k0, k1)


def brute(done: list[Rect], target: Rect) -> bool:
    for x in range(int(target.t0), int(target.t1)):
        for y in range(_k(target.k0), _k(target.k1)):
            if not any(r.t0 <= x and x + 1 <= r.t1 and _k(r.k0) <= y and y + 1 <= _k(r.k1) for r in done):
                return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.lists(rects(), max_size=8), rects())
def test_covers_matches_brute_force(done, target):
    assert Coverage(done).covers(target) == brute(done, target)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=10))
def test_merge_is_a_disjoint_sorted_union(intervals):
    merged = merge(intervals)
    cells = {x for a, b in intervals for x in range(a, b)}
    assert {x for a, b in merged for x in range(a, b)} == cells
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(merged, merged[1:]))  # disjoint and not touching


def test_day_chunks_cover_a_week_chunk_and_a_gap_does_not():
    days = plan_chunks("2024-01-01", "2024-01-15", "day", "UTC")
    week = plan_chunks("2024-01-01", "2024-01-08", "week", "UTC")[0]
    cov = Coverage(rect(c.start, c.end) for c in days)
    assert cov.covers(rect(week.start, week.end))
    holed = Coverage(rect(c.start, c.end) for c in days if c.start.day != 3)
    assert not holed.covers(rect(week.start, week.end))


def test_key_ranges_of_the_same_time_range_cover_its_time_chunks():
    lo, hi = pendulum.datetime(2024, 1, 1), pendulum.datetime(2024, 2, 1)
    cov = Coverage([rect(lo, hi, None, 100), rect(lo, hi, 100, 5000), rect(lo, hi, 5000, None)])
    assert all(cov.covers(rect(c.start, c.end)) for c in plan_chunks(lo, hi, "day", "UTC"))
    assert not Coverage([rect(lo, hi, None, 100), rect(lo, hi, 101, None)]).covers(rect(lo, hi))
