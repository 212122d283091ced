"""Chunk planning: cut a half-open range ``[start, end)`` into calendar chunks.

Pure: no Airflow, no database. Boundaries are local calendar boundaries in the spec's timezone,
so a ``day`` chunk across a DST change is 23 or 25 hours long, and an ``hour`` chunk on a
fall-back night is labelled with its UTC offset so the two 01:00 hours stay distinct.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Iterator

import pendulum

from airflow_backfill_provider.exceptions import PlanError

GRANULARITIES = ("hour", "day", "week", "month")
#: Airflow's default ``[core] max_map_length``: a mapped task cannot expand to more instances.
DEFAULT_MAX_CHUNKS = 1024

_STEP = {"hour": {"hours": 1}, "day": {"days": 1}, "week": {"weeks": 1}, "month": {"months": 1}}


@dataclass(frozen=True)
class Chunk:
    """One half-open time slice ``[start, end)``; ``chunk_id`` is stable for the same range."""

    chunk_id: str
    start: pendulum.DateTime
    end: pendulum.DateTime
    #: chunk_by: key (keyranges.py): the chunk is also ``key_column >= key_lo AND key_column < key_hi``;
    #: None = unbounded on that side, so the key ranges of a plan cover every key exactly once
    key_column: str | None = None
    key_lo: int | None = None
    key_hi: int | None = None

    @property
    def keyed(self) -> bool:
        return self.key_column is not None

    def to_descriptor(self) -> dict:
        """The small, JSON-safe dict that travels through XCom to one mapped task instance."""
        d = {"chunk_id": self.chunk_id, "start": self.start.isoformat(), "end": self.end.isoformat()}
        if self.keyed:
            d["key"] = [self.key_column, self.key_lo, self.key_hi]
        return d

    @classmethod
    def from_descriptor(cls, d: dict) -> "Chunk":
        try:
            key = d.get("key") or [None, None, None]
            col, lo, hi = str(key[0]) if key[0] is not None else None, key[1], key[2]
            if any(v is not None and not isinstance(v, int) for v in (lo, hi)):
                raise TypeError("key bounds must be integers or null")
            return cls(str(d["chunk_id"]), pendulum.parse(d["start"]), pendulum.parse(d["end"]), col, lo, hi)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise PlanError(
                f"bad chunk descriptor {d!r}: expected keys chunk_id, start, end (ISO timestamps)"
                " and optionally key: [column, lo, hi]"
            ) from err


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise PlanError(f"granularity={granularity!r} is not valid; choose one of {', '.join(GRANULARITIES)}")
    return granularity


def check_timezone(name: str):
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
            parsed = pendulum.datetime(value.year, value.month, value.day, tz=tz)
        elif isinstance(value, str) and value.strip():
            parsed = pendulum.parse(value.strip(), tz=tz)
        else:
            raise ValueError("empty")
    except (ValueError, TypeError, pendulum.parsing.exceptions.ParserError) as err:
        raise PlanError(f"{what}={value!r} is not a date; use YYYY-MM-DD (or an ISO timestamp)") from err
    if not isinstance(parsed, pendulum.DateTime):  # pendulum.parse("2021-01-01T..") variants
        raise PlanError(f"{what}={value!r} is not a date; use YYYY-MM-DD (or an ISO timestamp)")
    return parsed.in_timezone(tz)


def _floor(moment: pendulum.DateTime, granularity: str) -> pendulum.DateTime:
    return moment.start_of(granularity)  # week starts on Monday (ISO)


def _label(start: pendulum.DateTime, granularity: str) -> str:
    if granularity == "hour":
        return start.format("YYYY-MM-DDTHH:mmZ")  # offset keeps fall-back hours distinct
    if granularity == "day":
        return start.format("YYYY-MM-DD")
    if granularity == "week":
        return f"{start.isocalendar()[0]}-W{start.isocalendar()[1]:02d}"
    return start.format("YYYY-MM")


def _partial_label(start: pendulum.DateTime, end: pendulum.DateTime, granularity: str) -> str:
    fmt = "YYYY-MM-DDTHH:mmZ" if granularity == "hour" or start.time() != dt.time(0) or end.time() != dt.time(0) else "YYYY-MM-DD"
    return f"{start.format(fmt)}..{end.format(fmt)}"


def iter_chunks(start, end, granularity: str, tz_name: str) -> Iterator[Chunk]:
    """Yield chunks lazily; the first and last may be partial periods when the range is not aligned."""
    check_granularity(granularity)
    lo = to_datetime(start, tz_name, what="start")
    hi = to_datetime(end, tz_name, what="end")
    if hi <= lo:
        raise PlanError(f"end ({hi.isoformat()}) must be after start ({lo.isoformat()}); the range is [start, end)")
    cur = _floor(lo, granularity)
    step = _STEP[granularity]
    while cur < hi:
        nxt = cur.add(**step)
        a, b = max(cur, lo), min(nxt, hi)
        label = _label(cur, granularity) if (a == cur and b == nxt) else _partial_label(a, b, granularity)
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
    return min(end, watermark)


def split_at(chunks: list[Chunk], boundaries: list[pendulum.DateTime]) -> list[Chunk]:
    """Split chunks that straddle a boundary (e.g. a historical schema change) into two chunks."""
    out: list[Chunk] = []
    for chunk in chunks:
        cuts = sorted(b for b in boundaries if chunk.start < b < chunk.end)
        if not cuts:
            out.append(chunk)
            continue
        edges = [chunk.start, *cuts, chunk.end]
        for a, b in zip(edges, edges[1:]):
            out.append(replace(chunk, chunk_id=f"{chunk.chunk_id}@{a.format('YYYY-MM-DDTHH:mm')}", start=a, end=b))
    return out
