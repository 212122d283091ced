"""Key-range chunks (``chunk_by: key``): half-open ranges ``[lo, hi)`` of an integer key.

Why: on a table whose time column does not follow the physical order of the rows (``pg_stats``
correlation near 0), every time chunk reads rows scattered over most of the table's pages, so a chunk
costs as much as the whole table. An integer primary key that grows with inserts follows the physical
order: a key range reads a contiguous run of pages through the key's index.

Boundaries come from statistics only: ``pg_class.reltuples`` (how many rows), the key's ``pg_stats``
histogram (where they are: equi-depth buckets follow gaps and skew), and ``min``/``max`` from the key's
index. No count. The first range is open below and the last open above, so the ranges of a plan cover
every key exactly once even when the statistics are stale (a row inserted after the plan with a larger
key falls in the last range).

The time column still bounds every key chunk: ``time >= start AND time < end`` of the run's range,
whose end is clipped to the live watermark as for time chunks, so rows at or after the watermark stay
with live ingest. Validation compares per day on the time column, as always.
"""

from __future__ import annotations

import math

from psycopg2 import sql

from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.plan.sourcestats import ColumnStats

INTEGER_TYPES = ("smallint", "integer", "bigint")


def label(column: str, lo: int | None, hi: int | None, *, first: int | None = None) -> str:
    """Readable grid label: ``id 1..200000`` (inclusive, as people count); open ends show ``..``."""
    shown_lo = lo if lo is not None else first
    left = "" if shown_lo is None else str(shown_lo)
    right = "" if hi is None else str(hi - 1)
    return f"{column} {left}..{right}"


def boundaries(stats: ColumnStats, kmin: int, kmax: int, rows: float | None, target: int) -> list[int]:
    """Inner cut points (sorted, distinct, in ``(kmin, kmax]``) for chunks of about ``target`` rows.

    With a histogram: cut at equal fractions of it (equi-depth, so gaps and skew are followed).
    Without one (never analyzed): split the key span evenly, assuming it is dense.
    """
    span = kmax - kmin + 1
    n_rows = rows if rows is not None and rows > 0 else float(span)
    n = max(1, math.ceil(n_rows / max(1, target)))
    if n == 1:
        return []
    if len(stats.bounds) >= 2:
        raw = [stats.quantile(i / n) for i in range(1, n)]
    else:
        raw = [kmin + span * i / n for i in range(1, n)]
    cuts = sorted({int(math.ceil(x)) for x in raw if kmin < math.ceil(x) <= kmax})
    return cuts


def plan_key_chunks(column: str, start, end, cuts: list[int], kmin: int | None) -> list[Chunk]:
    """Chunks over every key: ``(-inf, c1), [c1, c2), ..., [ck, +inf)``, each bounded by ``[start, end)``."""
    edges: list[int | None] = [None, *cuts, None]
    out = []
    for lo, hi in zip(edges, edges[1:]):
        out.append(Chunk(label(column, lo, hi, first=kmin), start, end, column, lo, hi))
    return out


def key_filter(chunk: Chunk, expressions: dict[str, str] | None = None) -> sql.Composed:
    """`` AND key >= lo AND key < hi`` (open sides left out), appended to the chunk's time-bounded SELECT.

    ``expressions``: the chunk's historical column expressions; a key column given one is cut on it (the
    value the row is loaded with), not on a same-named column of the historical table. The first range
    (open below) also takes rows whose key is NULL (a ``key_column`` that is not the unique key may
    hold NULLs), so the ranges of a plan partition every row, as a time chunk's rows are.
    """
    parts = []
    name = chunk.key_column
    k = (
        sql.SQL("({e})").format(e=sql.SQL(expressions[name]))
        if expressions and name in expressions
        else sql.Identifier(name)
    )
    if chunk.key_lo is not None:
        parts.append(sql.SQL(" AND {k} >= {v}").format(k=k, v=sql.Literal(int(chunk.key_lo))))
    if chunk.key_hi is not None:
        below = sql.SQL("{k} < {v}").format(k=k, v=sql.Literal(int(chunk.key_hi)))
        if chunk.key_lo is None:
            below = sql.SQL("({b} OR {k} IS NULL)").format(b=below, k=k)
        parts.append(sql.SQL(" AND {b}").format(b=below))
    return sql.Composed(parts)


def lock_suffix(chunk: Chunk) -> str:
    """Part of the chunk's advisory-lock name: two key chunks of one time range must not serialize."""
    return f"|{chunk.key_column}|{chunk.key_lo}|{chunk.key_hi}" if chunk.keyed else ""
