"""Instants, not wall clocks: chunk planning and chunk bounds over random ranges and timezones (pure).

Aware datetimes sharing one tzinfo compare by wall clock in Python, so every property here is checked
on instants (UTC). Ranges are drawn around the DST changes of zones with 1-hour, 30-minute and
midnight transitions.
"""

from __future__ import annotations

import datetime as dt

import pendulum
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from airflow_backfill_provider.core import timebounds
from airflow_backfill_provider.core.chunks import clip_end, plan_chunks, split_at, to_datetime, utc
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.plan.planning import resolve_range
from tests.specs import table_spec

ZONES = [
    "UTC",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Pacific/Chatham",
    "Europe/Berlin",
]
# DST changes of 2024 (UTC instants): New York, Lord Howe (30 min), Santiago (at local midnight), Chatham, Berlin
TRANSITIONS = [
    "2024-03-10T07:00Z",
    "2024-11-03T06:00Z",  # New York
    "2024-04-06T15:00Z",
    "2024-10-05T15:30Z",  # Lord Howe
    "2024-04-07T03:00Z",
    "2024-09-08T04:00Z",  # Santiago
    "2024-04-06T14:00Z",
    "2024-09-28T14:00Z",  # Chatham
    "2024-03-31T01:00Z",
    "2024-10-27T01:00Z",  # Berlin
]
_UTC = dt.timezone.utc
SPAN = {"hour": 60, "day": 24 * 40, "week": 24 * 200, "month": 24 * 700}  # max range length in hours


@st.composite
def instants(draw):
    """An instant near a DST change (or anywhere in 2024), to the minute."""
    base = pendulum.parse(draw(st.sampled_from(TRANSITIONS)))
    return base.add(minutes=draw(st.integers(-3 * 24 * 60, 3 * 24 * 60)))


@st.composite
def ranges(draw):
    granularity = draw(st.sampled_from(["hour", "day", "week", "month"]))
    tz = draw(st.sampled_from(ZONES))
    lo = draw(instants())
    hi = lo.add(minutes=draw(st.integers(1, SPAN[granularity] * 60)))
    return granularity, tz, lo.in_timezone(tz), hi.in_timezone(tz)


def _check_cover(chunks, lo, hi):
    assert chunks, "a non-empty range makes at least one chunk"
    assert utc(chunks[0].start) == utc(lo) and utc(chunks[-1].end) == utc(hi)
    for c in chunks:
        assert utc(c.start) < utc(c.end), f"inverted or empty chunk {c}"
    for a, b in zip(chunks, chunks[1:]):
        assert utc(a.end) == utc(b.start), f"gap or overlap between {a} and {b}"
    assert len({c.chunk_id for c in chunks}) == len(chunks)


_NY = "America/New_York"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ranges())
# the repeated hour itself (both ends 01:00 local), and a range ending in it
@example(
    (
        "hour",
        _NY,
        pendulum.parse("2024-11-03T05:00Z").in_timezone(_NY),
        pendulum.parse("2024-11-03T06:00Z").in_timezone(_NY),
    )
)
@example(
    (
        "day",
        _NY,
        pendulum.parse("2024-11-02T04:00Z").in_timezone(_NY),
        pendulum.parse("2024-11-03T06:20Z").in_timezone(_NY),
    )
)
def test_chunks_cover_the_range_contiguously_in_instants(case):
    granularity, tz, lo, hi = case
    _check_cover(plan_chunks(lo, hi, granularity, tz, max_chunks=10_000), lo, hi)


@settings(max_examples=300, deadline=None)
@given(ranges(), st.lists(instants(), max_size=4))
def test_split_at_and_clip_keep_the_cover(case, cuts):
    granularity, tz, lo, hi = case
    chunks = plan_chunks(lo, hi, granularity, tz, max_chunks=10_000)
    _check_cover(split_at(chunks, [c.in_timezone(tz) for c in cuts]), lo, hi)
    # a watermark anywhere in the range (e.g. inside a repeated hour) clips by instant
    for wm in cuts:
        wm = wm.in_timezone(tz)
        end = clip_end(hi, wm)
        assert utc(end) == min(utc(hi), utc(wm))
        if utc(end) > utc(lo):
            _check_cover(plan_chunks(lo, end, granularity, tz, max_chunks=10_000), lo, end)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(ZONES), instants(), instants())
def test_wall_time_and_local_date_are_monotonic_in_the_instant(tz, a, b):
    a, b = sorted([a, b], key=utc)
    assert timebounds.wall(a, tz) <= timebounds.wall(b, tz)
    assert timebounds.local_date(a, tz) <= timebounds.local_date(b, tz)


@settings(max_examples=300, deadline=None)
@given(ranges())
def test_chunk_bounds_of_every_kind_partition_the_range(case):
    """Consecutive chunks share their bound literal and bounds never go down: a value is in exactly one."""
    granularity, tz, lo, hi = case
    chunks = plan_chunks(lo, hi, granularity, tz, max_chunks=10_000)
    for kind in timebounds.KINDS:
        pairs = [timebounds.bounds(kind, c.start, c.end, tz) for c in chunks]
        for (_a_lo, a_hi), (b_lo, _b_hi) in zip(pairs, pairs[1:]):
            assert a_hi == b_lo
        assert all(x_lo <= x_hi for x_lo, x_hi in pairs), f"{kind}: an inverted range in {pairs}"


@pytest.mark.parametrize("tz", ZONES)
def test_timestamptz_bounds_are_utc_and_wall_bounds_are_naive(tz):
    start = pendulum.datetime(2024, 1, 15, tz=tz)
    lo_tz, _ = timebounds.bounds("timestamptz", start, start.add(days=1), tz)
    lo_ts, _ = timebounds.bounds("timestamp", start, start.add(days=1), tz)
    lo_d, hi_d = timebounds.bounds("date", start, start.add(days=1), tz)
    assert lo_tz.utcoffset() == dt.timedelta(0) and lo_tz == start
    assert lo_ts == dt.datetime(2024, 1, 15) and lo_ts.tzinfo is None
    assert (lo_d, hi_d) == (dt.date(2024, 1, 15), dt.date(2024, 1, 16))


def test_new_york_fall_back_hours_as_wall_time():
    """The repeated 01:00 hour goes to the chunk of its second pass; the first pass is an empty wall range."""
    tz = "America/New_York"
    chunks = plan_chunks("2024-11-03", "2024-11-04", "hour", tz)
    walls = {c.chunk_id: timebounds.bounds("timestamp", c.start, c.end, tz) for c in chunks}
    one = dt.datetime(2024, 11, 3, 1)
    assert walls["2024-11-03T01:00-04:00"] == (one, one)
    assert walls["2024-11-03T01:00-05:00"] == (one, one.replace(hour=2))
    spring = plan_chunks("2024-03-10", "2024-03-11", "hour", tz)
    across = next(c for c in spring if c.chunk_id == "2024-03-10T01:00-05:00")
    assert timebounds.bounds("timestamp", across.start, across.end, tz) == (
        dt.datetime(2024, 3, 10, 1),
        dt.datetime(2024, 3, 10, 3),
    )  # spans the gap: 02:xx lands here


def test_santiago_days_start_at_local_midnight_after_a_missing_midnight():
    """2024-09-08 has no 00:00 in Santiago: that day starts at 01:00, and later days at 00:00 again."""
    chunks = plan_chunks("2024-09-06", "2024-09-11", "day", "America/Santiago")
    assert [c.chunk_id for c in chunks] == ["2024-09-06", "2024-09-07", "2024-09-08", "2024-09-09", "2024-09-10"]
    assert [c.start.hour for c in chunks] == [0, 0, 1, 0, 0]
    assert [timebounds.bound("date", c.start, "America/Santiago").day for c in chunks] == [6, 7, 8, 9, 10]


def test_airflow_hourly_interval_in_the_repeated_hour_is_not_empty():
    """CronDataIntervalTimetable's run for 2024-11-03 05:00Z-06:00Z in New York (both 01:00 local)."""
    spec = table_spec("s", "d", "t", time_column="ts", timezone="America/New_York", granularity="hour")
    lo, hi = resolve_range(
        spec,
        param_start=None,
        param_end=None,
        run_type="scheduled",
        interval_start=pendulum.datetime(2024, 11, 3, 5, tz="UTC"),
        interval_end=pendulum.datetime(2024, 11, 3, 6, tz="UTC"),
    )
    chunks = plan_chunks(lo, hi, "hour", spec.timezone)
    assert [c.chunk_id for c in chunks] == ["2024-11-03T01:00-04:00"]
    assert (utc(chunks[0].start), utc(chunks[0].end)) == (
        dt.datetime(2024, 11, 3, 5, tzinfo=_UTC),
        dt.datetime(2024, 11, 3, 6, tzinfo=_UTC),
    )


def test_hour_chunks_on_a_date_column_are_refused_with_the_fix():
    with pytest.raises(PermanentChunkError, match=r"granularity='hour' on time_column 'd'.*granularity: day"):
        timebounds.check_granularity("date", "hour", column="d")
    timebounds.check_granularity("date", "day", column="d")
    timebounds.check_granularity("timestamp", "hour", column="d")


def test_to_datetime_reads_a_bare_date_as_the_first_instant_of_that_day():
    start = to_datetime(dt.date(2024, 9, 8), "America/Santiago", what="start")
    assert utc(start) == dt.datetime(2024, 9, 8, 4, tzinfo=_UTC)  # 01:00-03:00, the first moment of the day
