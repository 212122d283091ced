"""THE rule for comparing a time column with a chunk's ``[start, end)``: literals of the column's own type.

A chunk is two instants. How they become SQL literals depends on the type of what is filtered:

- ``timestamptz``: the instants, as UTC literals (``'...+00:00'::timestamptz``);
- ``timestamp`` (naive): local wall time in the spec's timezone (``'...'::timestamp``);
- ``date``: local dates in the spec's timezone (``'...'::date``); a date is its local midnight, so a
  bound that is not the first instant of its day rounds up to the next date. Sub-day chunks on a
  ``date`` column are refused (:func:`check_granularity`).

Never a ``timestamptz`` literal compared with a ``date``/``timestamp`` column: PostgreSQL would cast
the column in the *session* TimeZone, which is neither the spec's timezone nor stable across servers.
Each literal carries its own type and no session setting changes how it is read (ISO input is read
the same under every DateStyle).

Wall time must map instants monotonically, or two chunks could both claim a row. On a fall-back night
the repeated wall hour (e.g. 01:00-02:00 in New York) belongs to the chunk holding its *second* pass:
an instant in the first pass maps to the start of the repeat, so the chunk ``[01:00-04:00,
01:00-05:00)`` is the empty wall range ``[01:00, 01:00)`` and ``[01:00-05:00, 02:00-05:00)`` takes every
naive 01:xx row. At spring-forward the chunk across the gap spans it (``[01:00, 03:00)``), so a naive
value inside the gap (which no clock showed) still lands in exactly one chunk. docs/time.md has more.

Every caller that filters by a chunk range (the chunk select, the cast-failure finder) and live
ingest (its lower bound, and its watermark read back from a naive or date cursor) go through this module. Validation deliberately does not: it buckets by day in SQL on
its own (validate.py), so a mistake here shows up there.
"""

from __future__ import annotations

import datetime as dt
import math
from zoneinfo import ZoneInfo

from psycopg2 import sql

from airflow_backfill_provider.core.chunks import day_start
from airflow_backfill_provider.core.exceptions import PermanentChunkError

DATE, TIMESTAMP, TIMESTAMPTZ = "date", "timestamp", "timestamptz"
KINDS = (DATE, TIMESTAMP, TIMESTAMPTZ)
#: RowDescription type OIDs (a domain over one of these is reported as its base type)
_OIDS = {1082: DATE, 1114: TIMESTAMP, 1184: TIMESTAMPTZ}
_UTC = dt.timezone.utc


def kind_of_type(type_sql: str | None) -> str | None:
    """``format_type()`` text -> one of KINDS; None when it is not one of them (e.g. a domain: probe it)."""
    if not type_sql:
        return None
    t = type_sql.strip().lower()
    if t == "date":
        return DATE
    if t.startswith("timestamp") and t.endswith("without time zone"):
        return TIMESTAMP
    if t.startswith("timestamp") and t.endswith("with time zone"):
        return TIMESTAMPTZ
    return None


def probe_kind(conn, table_sql: sql.Composable, expr: sql.Composable, *, what: str) -> str:
    """The type of ``expr`` as the source computes it (``LIMIT 0``: reads no row), as one of KINDS.

    For historical column expressions and domains, whose type the catalog row does not say directly.
    """
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {e} FROM {t} LIMIT 0").format(e=expr, t=table_sql))
        oid = cur.description[0][1]
        cur.execute("SELECT format_type(%s, NULL)", (oid,))
        name = cur.fetchone()[0]
    kind = _OIDS.get(oid)
    if kind is None:
        raise PermanentChunkError(
            f"{what} is of type {name}; chunks can only filter a date, timestamp or timestamptz. "
            "Map it to one of those with a historical.column_expressions entry for the time column "
            '(e.g. "to_timestamp(epoch_s)"), or choose another time_column'
        )
    return kind


def source_kind(conn, table, plan) -> str:
    """The kind of what the chunk filter compares on the source: the catalog type of a plain time
    column, else (historical expression, domain) the type the source computes for it."""
    kind = kind_of_type(plan.time_source_type)
    if kind is not None:
        return kind
    return probe_kind(
        conn,
        sql.Identifier(*table.parts),
        plan.time_filter,
        what=f"the time column's source expression {plan.time_filter.as_string(conn)} on {table}",
    )


def check_granularity(kind: str, granularity: str, *, column: str) -> None:
    """A ``date`` column cannot be cut below a day: an hour chunk would be all or nothing of its day."""
    if kind == DATE and granularity == "hour":
        raise PermanentChunkError(
            f"granularity='hour' on time_column {column!r}, which is a date: a date has no hours, so hour "
            "chunks cannot split it. Set granularity: day (or week/month) for this table"
        )


def _zone(tz_name: str) -> ZoneInfo:
    return ZoneInfo(tz_name)


def _offset(moment: dt.datetime) -> dt.timedelta:
    """utcoffset() of an aware datetime (typed optional; a zoneinfo zone always has one)."""
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError(f"{moment!r} has no UTC offset")
    return offset


def wall(instant: dt.datetime, tz_name: str) -> dt.datetime:
    """Naive local wall time of an instant, monotonic in the instant (see the module docstring)."""
    tz = _zone(tz_name)
    local = instant.astimezone(tz)
    naive = local.replace(tzinfo=None)
    first = _offset(naive.replace(tzinfo=tz, fold=0))
    second = _offset(naive.replace(tzinfo=tz, fold=1))
    if first > second and local.utcoffset() == first:
        # first pass of a repeated wall time: map to where the repeat starts (the transition instant,
        # read in the new offset). Binary search on whole seconds: tzdata transitions are whole seconds.
        lo = math.floor(instant.timestamp())
        hi = math.ceil((naive - second).replace(tzinfo=_UTC).timestamp())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if dt.datetime.fromtimestamp(mid, tz).utcoffset() == first:
                lo = mid
            else:
                hi = mid
        return (dt.datetime.fromtimestamp(hi, _UTC) + second).replace(tzinfo=None)
    return naive


def local_date(instant: dt.datetime, tz_name: str) -> dt.date:
    """The first local date whose first instant is at or after ``instant`` (a date is its midnight)."""
    day = wall(instant, tz_name).date()
    if day_start(day, tz_name).timestamp() < instant.timestamp():
        day += dt.timedelta(days=1)
    return day


def bound(kind: str, instant: dt.datetime, tz_name: str):
    """One bound as a Python value of the column's kind; ``sql.Literal`` renders it with its type
    (``'2024-01-01'::date``, ``'2024-01-01T00:00:00'::timestamp``, ``'...+00:00'::timestamptz``)."""
    if kind == TIMESTAMPTZ:
        return instant.astimezone(_UTC)
    if kind == TIMESTAMP:
        return wall(instant, tz_name)
    if kind == DATE:
        return local_date(instant, tz_name)
    raise ValueError(f"time kind {kind!r} is not one of {KINDS}")


def bounds(kind: str, start: dt.datetime, end: dt.datetime, tz_name: str) -> tuple:
    """``(lo, hi)`` for ``column >= lo AND column < hi``; ``lo == hi`` (an empty range) is possible."""
    return bound(kind, start, tz_name), bound(kind, end, tz_name)


def literal(kind: str, instant: dt.datetime, tz_name: str) -> sql.Composed:
    """The bound as an explicitly typed SQL literal (the type name is a constant of this module)."""
    value = bound(kind, instant, tz_name)
    return sql.SQL("{v}::{t}").format(v=sql.Literal(value.isoformat()), t=sql.SQL(kind))


def at_or_before(kind: str, instant: dt.datetime, tz_name: str):
    """A value for ``column >= value`` that keeps every row at or after ``instant``, rounded DOWN (live
    ingest's time arm: reading a little more is free, reading less loses rows). A date: its local day."""
    if kind == DATE:
        return wall(instant, tz_name).date()
    return bound(kind, instant, tz_name)


def after(kind: str, instant: dt.datetime, tz_name: str):
    """A value for ``column > value`` that keeps every row at or after ``instant`` (live ingest's lower
    bound: generous, since re-reading a row is free). A date keeps the whole local day of ``instant``."""
    if kind == DATE:
        return wall(instant, tz_name).date() - dt.timedelta(days=1)
    return bound(kind, instant, tz_name)


def instant_sql(kind: str, expr: sql.Composable, tz_name: str) -> sql.Composed:
    """``expr`` of ``kind`` as a timestamptz: a naive wall time (a date: its midnight) read in the spec's
    timezone, never in the session's (a cursor's maximum becomes the watermark, an instant)."""
    if kind == TIMESTAMPTZ:
        return sql.SQL("({e})").format(e=expr)
    if kind == TIMESTAMP:
        return sql.SQL("(({e}) AT TIME ZONE {tz})").format(e=expr, tz=sql.Literal(tz_name))
    if kind == DATE:
        return sql.SQL("(({e})::timestamp AT TIME ZONE {tz})").format(e=expr, tz=sql.Literal(tz_name))
    raise ValueError(f"time kind {kind!r} is not one of {KINDS}")
