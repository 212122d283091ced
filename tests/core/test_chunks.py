"""Chunk planning is pure: no DB, no Airflow."""

import datetime as dt

import pendulum
import pytest

from airflow_backfill_provider.core.chunks import Chunk, clip_end, plan_chunks, split_at, to_datetime
from airflow_backfill_provider.core.exceptions import PlanError


def hours(c: Chunk) -> float:
    return (c.end - c.start).total_seconds() / 3600


def test_day_chunks_are_half_open_and_contiguous():
    chunks = plan_chunks("2024-01-01", "2024-01-05", "day", "UTC")
    assert [c.chunk_id for c in chunks] == ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]
    for a, b in zip(chunks, chunks[1:]):
        assert a.end == b.start
    assert chunks[0].start == pendulum.datetime(2024, 1, 1, tz="UTC")
    assert chunks[-1].end == pendulum.datetime(2024, 1, 5, tz="UTC")


def test_dst_spring_forward_day_is_23_hours_and_fall_back_25():
    spring = plan_chunks("2021-03-14", "2021-03-15", "day", "America/New_York")
    fall = plan_chunks("2021-11-07", "2021-11-08", "day", "America/New_York")
    assert [c.chunk_id for c in spring] == ["2021-03-14"] and hours(spring[0]) == 23
    assert [c.chunk_id for c in fall] == ["2021-11-07"] and hours(fall[0]) == 25


def test_fall_back_hours_have_distinct_ids_and_cover_25_hours():
    chunks = plan_chunks("2021-11-07", "2021-11-08", "hour", "America/New_York")
    assert len(chunks) == 25
    assert len({c.chunk_id for c in chunks}) == 25
    assert "2021-11-07T01:00-04:00" in [c.chunk_id for c in chunks]
    assert "2021-11-07T01:00-05:00" in [c.chunk_id for c in chunks]
    assert all(hours(c) == 1 for c in chunks)


def test_spring_forward_gap_hour_does_not_exist():
    chunks = plan_chunks("2021-03-14", "2021-03-15", "hour", "America/New_York")
    assert len(chunks) == 23
    assert not any(c.chunk_id.startswith("2021-03-14T02:") for c in chunks)


def test_week_and_month_and_partial_edges():
    weeks = plan_chunks("2021-03-10", "2021-04-02", "week", "UTC")
    assert [c.chunk_id for c in weeks] == ["2021-03-10..2021-03-15", "2021-W11", "2021-W12", "2021-03-29..2021-04-02"]
    months = plan_chunks("2024-01-01", "2024-04-01", "month", "Europe/Berlin")
    assert [c.chunk_id for c in months] == ["2024-01", "2024-02", "2024-03"]
    assert months[2].start.utcoffset() != months[2].end.utcoffset()  # DST starts in March


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("2024-01-05", "2024-01-01", "day", "UTC"), "must be after start"),
        (("2024-01-01", "2024-01-01", "day", "UTC"), "must be after start"),
        (("2024-01-01", "2024-01-02", "year", "UTC"), "choose one of hour, day, week, month"),
        (("2024-01-01", "2024-01-02", "day", "Mars/Olympus"), "not a known IANA timezone"),
        (("2024-13-01", "2024-01-02", "day", "UTC"), "start='2024-13-01' is not a date"),
    ],
)
def test_bad_ranges_name_the_problem(args, fragment):
    with pytest.raises(PlanError, match=fragment):
        plan_chunks(*args)


def test_too_many_chunks_says_what_to_change():
    with pytest.raises(PlanError) as err:
        plan_chunks("2000-01-01", "2026-01-01", "day", "UTC")
    msg = str(err.value)
    assert "max_chunks=1024" in msg and "batches" in msg and "'week'" in msg


def test_descriptor_round_trip_is_small_and_exact():
    c = plan_chunks("2021-03-14", "2021-03-15", "day", "America/New_York")[0]
    d = c.to_descriptor()
    assert set(d) == {"chunk_id", "start", "end"} and all(isinstance(v, str) for v in d.values())
    back = Chunk.from_descriptor(d)
    assert back.start == c.start and back.end == c.end and back.chunk_id == c.chunk_id
    with pytest.raises(PlanError, match="bad chunk descriptor"):
        Chunk.from_descriptor({"chunk_id": "x"})


def test_split_at_boundary_and_clip():
    chunks = plan_chunks("2021-05-01", "2021-07-01", "month", "UTC")
    cut = pendulum.datetime(2021, 5, 20, tz="UTC")
    parts = split_at(chunks, [cut])
    assert len(parts) == 3 and parts[0].end == cut and parts[1].start == cut
    assert clip_end(pendulum.datetime(2021, 7, 1, tz="UTC"), cut) == cut
    assert clip_end(cut, None) == cut


def test_to_datetime_reads_inputs_in_the_spec_timezone():
    assert to_datetime("2024-01-01", "America/New_York", what="start").utcoffset() == dt.timedelta(hours=-5)
    assert to_datetime(dt.date(2024, 7, 1), "Europe/Berlin", what="x").hour == 0
    aware = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)
    assert to_datetime(aware, "America/New_York", what="x").hour == 7
