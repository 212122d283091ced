"""Chunk planning: cut a half-open range ``[start, end)`` into calendar chunks.

Pure: no Airflow, no database. Boundaries are local calendar boundaries in the spec's timezone,
so a ``day`` chunk across a DST change is 23 or 25 hours long, and an ``hour`` chunk on a
fall-back night is labelled with its UTC offset so the two 01:00 hours stay distinct.

Every comparison goes through :func:`utc`: Python compares aware datetimes that share one tzinfo by
wall clock, so on a fall-back night ``01:00-04:00 == 01:00-05:00`` (docs/time.md).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any, Iterator

import pendulum

from airflow_backfill_provider.core.exceptions import PlanError

GRANULARITIES = ("hour", "day", "week", "month")
#: Airflow's default ``[core] max_map_length``: a mapped task cannot expand to more instances.
DEFAULT_MAX_CHUNKS = 1024


@dataclass(frozen=True)
class Chunk:
    """One half-open time slice ``[start, end)``; ``chunk_id`` is stable for the same range."""

    chunk_id: str
    start: pendulum.DateTime
    end: pendulum.DateTime
    #: chunk_by: key (plan/keyranges.py): the chunk is also ``key_column >= key_lo AND key_column < key_hi``;
    #: None = unbounded on that side, so the key ranges of a plan cover every key exactly once
    key_column: str | None = None
    key_lo: int | None = None
    key_hi: int | None = None

    @property
    def keyed(self) -> bool:
        return self.key_column is not None

    def to_descriptor(self) -> dict:
        """The small, JSON-safe dict that travels through XCom to one mapped task instance."""
        d: dict[str, Any] = {"chunk_id": self.chunk_id, "start": self.start.isoformat(), "end": self.end.isoformat()}
        if self.keyed:
            d["key"] = [self.key_column, self.key_lo, self.key_hi]
        return d

    @classmethod
    def from_descriptor(cls, d: dict, tz: str = "UTC") -> "Chunk":
        """From the plan's descriptor (ISO timestamps with offsets) or a user's (``tz``: how a date or a naive
        timestamp is read, e.g. the spec's timezone; an offset given in the text always wins)."""
        try:
            key = d.get("key") or [None, None, None]
            col, lo, hi = str(key[0]) if key[0] is not None else None, key[1], key[2]
            if any(v is not None and not isinstance(v, int) for v in (lo, hi)):
                raise TypeError("key bounds must be integers or null")
            start, end = parse_datetime(d["start"], tz), parse_datetime(d["end"], tz)
            if utc(end) <= utc(start):
                raise ValueError("end must be after start")
            return cls(str(d["chunk_id"]), start, end, col, lo, hi)
        except (KeyError, TypeError, ValueError, IndexError, pendulum.parsing.exceptions.ParserError) as err:
            raise PlanError(
                f"bad chunk descriptor {d!r}: expected keys chunk_id, start, end (ISO timestamps)"
                " and optionally key: [column, lo, hi]"
            ) from err


def parse_datetime(text: str, tz: str | pendulum.Timezone = "UTC") -> pendulum.DateTime:
    """``pendulum.parse`` narrowed to a DateTime (it may return a Date, Time or Duration): a date or a naive
    timestamp is read in ``tz``, an explicit offset is kept. ValueError for anything else."""
    parsed = pendulum.parse(str(text), tz=tz)
    if not isinstance(parsed, pendulum.DateTime):
        raise ValueError(f"{text!r} is not a date or timestamp")
    return parsed


def utc(moment: dt.datetime) -> dt.datetime:
    """The instant, for comparing: aware datetimes sharing a tzinfo compare by wall clock, not instant."""
    return moment.astimezone(dt.timezone.utc)


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise PlanError(f"granularity={granularity!r} is not valid; choose one of {', '.join(GRANULARITIES)}")
    return granularity


def check_timezone(name: str) -> pendulum.Timezone:
    try:
        return pendulum.timezone(name)
    except Exception as err:  # pendulum raises its own InvalidTimezone
        raise PlanError(
            f"timezone={name!r} is not a known IANA timezone; use e.g. 'UTC' or 'America/New_York'"
        ) from err


def to_datetime(value, tz_name: str, *, what: str) -> pendulum.DateTime:
    """A date string, datetime string, date or datetime, read in the spec's timezone.

    A bare date means local midnight; a naive datetime is local time; an aware one is converted.
    """
    tz = check_timezone(tz_name)
    try:
        if isinstance(value, pendulum.DateTime):
            parsed = value
        elif isinstance(value, dt.datetime):
            parsed = pendulum.instance(value, tz=tz) if value.tzinfo is None else pendulum.instance(value)
        elif isinstance(value, dt.date):
            parsed = day_start(value, tz)
        elif isinstance(value, str) and value.strip():
            parsed = parse_datetime(value.strip(), tz)
        else:
            raise ValueError("empty")
    except (ValueError, TypeError, pendulum.parsing.exceptions.ParserError) as err:
        raise PlanError(f"{what}={value!r} is not a date; use YYYY-MM-DD (or an ISO timestamp)") from err
    if not isinstance(parsed, pendulum.DateTime):  # pendulum.parse("2021-01-01T..") variants
        raise PlanError(f"{what}={value!r} is not a date; use YYYY-MM-DD (or an ISO timestamp)")
    return parsed.in_timezone(tz)


def day_start(day: dt.date, tz) -> pendulum.DateTime:
    """The first instant of a local date: a repeated midnight's first pass; a missing midnight (e.g.
    America/Santiago's spring-forward at 24:00) resolves to the first moment that exists (01:00)."""
    early = pendulum.datetime(day.year, day.month, day.day, tz=tz, fold=0)
    return early if early.date() == day else pendulum.datetime(day.year, day.month, day.day, tz=tz, fold=1)


def _period_day(day: dt.date, granularity: str) -> dt.date:
    if granularity == "week":
        return day - dt.timedelta(days=day.weekday())  # ISO weeks start on Monday
    if granularity == "month":
        return day.replace(day=1)
    return day


def _floor(moment: pendulum.DateTime, granularity: str) -> pendulum.DateTime:
    if granularity == "hour":
        return moment.start_of("hour")
    # not pendulum's start_of/add(days=1): they land on the wrong hour around a missing midnight
    return day_start(_period_day(moment.date(), granularity), moment.tz)


def _next(cur: pendulum.DateTime, granularity: str) -> pendulum.DateTime:
    """The next period boundary after ``cur``, always a later instant."""
    if granularity == "hour":
        nxt = cur.add(hours=1)  # absolute hour; re-aligned to the wall hour after a 30-minute shift
        aligned = nxt.start_of("hour")
        return aligned if utc(aligned) > utc(cur) else nxt
    day = _period_day(cur.date(), granularity)
    if granularity == "day":
        day += dt.timedelta(days=1)
    elif granularity == "week":
        day += dt.timedelta(weeks=1)
    else:
        day = (day.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return day_start(day, cur.tz)


def _label(start: pendulum.DateTime, granularity: str) -> str:
    if granularity == "hour":
        return start.format("YYYY-MM-DDTHH:mmZ")  # offset keeps fall-back hours distinct
    if granularity == "day":
        return start.format("YYYY-MM-DD")
    if granularity == "week":
        return f"{start.isocalendar()[0]}-W{start.isocalendar()[1]:02d}"
    return start.format("YYYY-MM")


def _partial_label(start: pendulum.DateTime, end: pendulum.DateTime, granularity: str) -> str:
    fmt = (
        "YYYY-MM-DDTHH:mmZ"
        if granularity == "hour" or start.time() != dt.time(0) or end.time() != dt.time(0)
        else "YYYY-MM-DD"
    )
    return f"{start.format(fmt)}..{end.format(fmt)}"


def iter_chunks(start, end, granularity: str, tz_name: str) -> Iterator[Chunk]:
    """Yield chunks lazily; the first and last may be partial periods when the range is not aligned."""
    check_granularity(granularity)
    lo = to_datetime(start, tz_name, what="start")
    hi = to_datetime(end, tz_name, what="end")
    if utc(hi) <= utc(lo):
        raise PlanError(f"end ({hi.isoformat()}) must be after start ({lo.isoformat()}); the range is [start, end)")
    cur = _floor(lo, granularity)
    if utc(cur) > utc(lo):  # cannot happen for whole periods; a guard so a chunk never starts after lo
        cur = lo
    while utc(cur) < utc(hi):
        nxt = _next(cur, granularity)
        a = lo if utc(lo) > utc(cur) else cur
        b = hi if utc(hi) < utc(nxt) else nxt
        whole = utc(a) == utc(cur) and utc(b) == utc(nxt)
        label = _label(cur, granularity) if whole else _partial_label(a, b, granularity)
        if utc(a) < utc(b):  # a wall-hour re-alignment after a 30-minute shift can touch lo
            yield Chunk(label, a, b)
        cur = nxt


def plan_chunks(start, end, granularity: str, tz_name: str, *, max_chunks: int = DEFAULT_MAX_CHUNKS) -> list[Chunk]:
    """All chunks of ``[start, end)``; refuses before building more than ``max_chunks``."""
    chunks: list[Chunk] = []
    for chunk in iter_chunks(start, end, granularity, tz_name):
        chunks.append(chunk)
        if len(chunks) > max_chunks:
            coarser = [g for g in GRANULARITIES[GRANULARITIES.index(granularity) + 1 :]]
            hint = f"use a coarser granularity ({' or '.join(repr(g) for g in coarser)}), " if coarser else ""
            raise PlanError(
                f"range [{start}, {end}) at granularity={granularity!r} makes more than max_chunks={max_chunks} "
                f"chunks (a safety cap on one plan; beyond max_mapped_chunks, under Airflow's [core] "
                f"max_map_length, chunks already run in batches); {hint}granularity: auto, a shorter range, "
                "or raise the spec's max_chunks"
            )
    return chunks


def clip_end(end: pendulum.DateTime, watermark: pendulum.DateTime | None) -> pendulum.DateTime:
    """The backfill never goes past the live watermark: live ingest owns everything at or after it."""
    if watermark is None:
        return end
    return watermark if utc(watermark) < utc(end) else end


def split_at(chunks: list[Chunk], boundaries: list[pendulum.DateTime]) -> list[Chunk]:
    """Split chunks that straddle a boundary (e.g. a historical schema change) into two chunks."""
    out: list[Chunk] = []
    for chunk in chunks:
        inside = {utc(b): b for b in boundaries if utc(chunk.start) < utc(b) < utc(chunk.end)}  # one per instant
        cuts = [inside[k] for k in sorted(inside)]
        if not cuts:
            out.append(chunk)
            continue
        edges = [chunk.start, *cuts, chunk.end]
        for a, b in zip(edges, edges[1:]):
            out.append(replace(chunk, chunk_id=f"{chunk.chunk_id}@{a.format('YYYY-MM-DDTHH:mm')}", start=a, end=b))
    return out
