"""Chunk sizes that fit the data: auto time chunks, the target, and advice on a poor choice.

Pure: estimates come in as functions and numbers (plan/sourcestats.py reads them from the catalog).

``granularity: auto`` groups calendar days (busy days split into hours) so each chunk holds about
``target`` rows by the statistics' estimate. Greedy over the periods in order:

- a day estimated above the target is cut into its hours (an hour is the smallest unit);
- a chunk is closed when it reaches the target, or before a period that would push it over the target
  once it holds at least half of it.

So every chunk but the last holds between 0.5x and 1.5x the target *by estimate* (an hour that alone
holds more than the target is its own chunk). Estimates come from a 100-bucket histogram; measured
against real counts on a skewed table (tests/plan/test_sizing.py) chunks stay within 1/3x-2x.
"""

from __future__ import annotations

import math
from typing import Callable

from airflow_backfill_provider.core.chunks import GRANULARITIES, Chunk, iter_chunks

#: with no statistics and no ledger history, a chunk aims at this many rows
DEFAULT_TARGET_ROWS = 200_000


def target_rows(spec_target: int, target_seconds: float | None, measured: tuple[float, int] | None) -> tuple[int, str]:
    """The row target and why: from the ledger's measured rows/s when target_chunk_seconds is set."""
    if target_seconds and measured:
        rate, n = measured
        rows = max(1000, int(rate * target_seconds))
        return rows, (
            f"target {rows} rows per chunk = {rate:,.0f} rows/s measured over the last {n} chunk(s) in the ledger "
            f"x target_chunk_seconds={target_seconds:g}"
        )
    if target_seconds:
        return spec_target, (
            f"target_chunk_rows={spec_target} (no chunk in the ledger yet to measure rows/s for "
            f"target_chunk_seconds={target_seconds:g})"
        )
    return spec_target, f"target_chunk_rows={spec_target}"


def _label(start, end) -> str:
    whole_days = start.time().hour == start.time().minute == 0 and end.time().hour == end.time().minute == 0
    fmt = "YYYY-MM-DD" if whole_days else "YYYY-MM-DDTHH:mmZ"
    return f"{start.format(fmt)}..{end.format(fmt)}"


def auto_time_chunks(lo, hi, tz: str, estimate: Callable[[float, float], float], target: int) -> list[Chunk]:
    """Group days (busy days as hours) of ``[lo, hi)`` into chunks of about ``target`` estimated rows."""
    atoms: list[tuple[Chunk, float]] = []
    for day in iter_chunks(lo, hi, "day", tz):
        rows = estimate(day.start.timestamp(), day.end.timestamp())
        if rows > target:
            for hour in iter_chunks(day.start, day.end, "hour", tz):
                atoms.append((hour, estimate(hour.start.timestamp(), hour.end.timestamp())))
        else:
            atoms.append((day, rows))
    out: list[Chunk] = []
    group: list[Chunk] = []
    total = 0.0

    def close():
        nonlocal group, total
        if group:
            a, b = group[0], group[-1]
            out.append(a if len(group) == 1 else Chunk(_label(a.start, b.end), a.start, b.end))
        group, total = [], 0.0

    for atom, rows in atoms:
        if group and total + rows > target and total >= target / 2:
            close()
        group.append(atom)
        total += rows
        if total >= target:
            close()
    close()
    return out


def suggest_granularity(total_rows: float, lo, hi, tz: str, target: int) -> str:
    """The calendar granularity whose average chunk is nearest the target (in ratio)."""
    span_h = (hi.timestamp() - lo.timestamp()) / 3600
    hours = {"hour": 1, "day": 24, "week": 168, "month": 730}
    best, err = "month", math.inf
    for g in GRANULARITIES:
        per_chunk = total_rows * min(1.0, hours[g] / max(span_h, 1e-9))
        e = abs(math.log(max(per_chunk, 1) / target))
        if e < err:
            best, err = g, e
    return best


def pages_touched(
    rows_per_chunk: float, pages: int, correlation: float | None, table_rows: float | None = None
) -> float:
    """Expected heap pages one chunk reads: contiguous when correlated, scattered when not.

    Uncorrelated rows land on pages at random: P * (1 - (1 - 1/P)^r) distinct pages for r rows.
    Correlation c blends the two (|c| = 1: r / rows-per-page pages; without ``table_rows``, one row a page).
    """
    if pages <= 0:
        return 0.0
    scattered = pages * (1 - (1 - 1 / pages) ** rows_per_chunk)
    per_page = table_rows / pages if table_rows and table_rows > pages else 1.0
    c = abs(correlation or 0.0)
    return c * c * min(pages, rows_per_chunk / per_page) + (1 - c * c) * scattered


#: ``granularity: auto`` cuts key ranges instead of time chunks when the time chunks would read at least this
#: many times the table's pages in all (key ranges read it about once)
KEY_RANGE_READ_FACTOR = 2.0


def prefer_key_ranges(
    *,
    n_time_chunks: int,
    est_rows: float,
    table_rows: float | None,
    pages: int,
    time_corr: float | None,
    key_corr: float | None,
    key_indexed: bool,
    historical: bool,
    target: int,
    stats_label: str = "pg_stats.",
) -> str | None:
    """Why ``granularity: auto`` should cut key ranges rather than time chunks, or None to keep time chunks.

    Time chunks on a table not in time order each read pages from all over it (:func:`pages_touched`);
    ranges of an indexed integer key that follows the physical order read contiguous pages, the whole
    table about once in all. Only when that is known from the statistics or a sample (both correlations), the key
    is indexed, the range needs more than one time chunk and no historical ranges switch the source by
    time (their split is by time).
    """
    if historical or n_time_chunks < 2 or not key_indexed or pages <= 0 or not table_rows:
        return None
    if time_corr is None or key_corr is None or abs(key_corr) < 0.9:
        return None
    per_chunk = est_rows / n_time_chunks
    time_reads = n_time_chunks * pages_touched(per_chunk, pages, time_corr, table_rows)
    if time_reads < KEY_RANGE_READ_FACTOR * pages:
        return None
    n_key = max(1, math.ceil(table_rows / max(1, target)))
    return (
        f"the time column is not in physical order ({stats_label}correlation {time_corr:.2f}), so {n_time_chunks} time "
        f"chunks would read ~{time_reads / pages:.1f}x the table's {pages:,} pages; ~{n_key} ranges of the indexed key "
        f"(correlation {key_corr:.2f}) read it about once"
    )


def advice(
    *,
    chunk_by: str,
    granularity: str,
    n_chunks: int,
    est_rows: float | None,
    target: int,
    pages: int,
    time_corr: float | None,
    key_corr: float | None,
    key_indexed: bool,
    time_column: str,
    key_column: str | None,
    lo=None,
    hi=None,
    tz: str = "UTC",
    table_rows: float | None = None,
) -> list[str]:
    """Log lines for the plan: tiny chunks, and time chunks on a table not in time order."""
    notes: list[str] = []
    if est_rows is None or n_chunks == 0:
        return notes
    per_chunk = est_rows / n_chunks
    if chunk_by == "time" and granularity != "auto" and per_chunk < target / 10 and n_chunks > 1:
        better = suggest_granularity(est_rows, lo, hi, tz, target) if lo is not None else "auto"
        notes.append(
            f"granularity={granularity!r} gives tiny chunks: ~{per_chunk:,.0f} rows each by the statistics "
            f"(target {target:,}); each chunk also pays fixed costs (a task instance, sessions, a transaction). "
            f"Suggest granularity: {better!r} (or 'auto')."
        )
    if chunk_by == "time" and n_chunks > 1 and pages > 0:
        touched = pages_touched(per_chunk, pages, time_corr, table_rows)
        if touched > 0.5 * pages:
            key_hint = (
                f"; use chunk_by: key ({key_column} has correlation {key_corr:.2f}"
                f"{', indexed' if key_indexed else ', but no index leads on it'}), which reads contiguous pages"
                if key_column and key_corr is not None and abs(key_corr) > 0.9
                else ""
            )
            notes.append(
                f"the table is not in {time_column} order (pg_stats.correlation "
                f"{'unknown' if time_corr is None else format(time_corr, '.2f')}"
                f"): each time chunk of ~{per_chunk:,.0f} rows would read ~{touched / pages:.0%} of the table's "
                f"{pages:,} pages, so every chunk costs about a full scan{key_hint}."
            )
    return notes
