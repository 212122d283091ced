"""How a plan cuts its range: calendar chunks, auto-sized chunks or key ranges, and why (docs/chunking.md).

Called by ``planning.build_plan``; every choice and every piece of advice is appended to the plan's
notes, which the plan task logs.
"""

from __future__ import annotations

import logging

from airflow_backfill_provider.ledger import coverage, table as ledger
from airflow_backfill_provider.plan import keyranges, sizing, sourcestats
from airflow_backfill_provider.core.chunks import Chunk, plan_chunks
from airflow_backfill_provider.core.exceptions import PlanError
from airflow_backfill_provider.core.spec import BackfillSpec, TableName

log = logging.getLogger(__name__)


def make_chunks(spec: BackfillSpec, lo, hi, granularity: str, notes: list[str], *, src_conn=None, dst_conn=None):
    """(chunks, effective granularity label) for ``[lo, hi)``."""
    measured = None
    if spec.target_chunk_seconds and dst_conn is not None:
        from airflow_backfill_provider.prepare import identity

        # the ledger keys rows by the resolved relation (prepare/identity.py)
        target_name = identity.resolve(dst_conn, spec.staging_target, side="destination", missing_ok=True)
        measured = ledger.measured_rate(dst_conn, TableName.parse(spec.ledger_table), target_name)
    target, why = sizing.target_rows(spec.target_chunk_rows, spec.target_chunk_seconds, measured)

    if src_conn is None:  # planning without the source (tests, dry tools): calendar chunks only
        if spec.chunk_by == "key":
            raise PlanError("chunk_by: key needs the source's statistics: plan with a source connection")
        if granularity == "auto":
            notes.append("granularity auto without a source connection: fell back to 'day'")
            granularity = "day"
        return plan_chunks(lo, hi, granularity, spec.timezone, max_chunks=spec.max_chunks), granularity

    table = spec.source
    tstats = sourcestats.table_stats(src_conn, table)
    time_stats = sourcestats.column_stats(src_conn, table, spec.time_column, as_time_in=spec.timezone)
    key_col = spec.effective_key_column
    key_type = sourcestats.column_type(src_conn, table, key_col)
    key_is_int = key_type in keyranges.INTEGER_TYPES
    key_stats = sourcestats.column_stats(src_conn, table, key_col) if key_is_int else sourcestats.ColumnStats()
    from airflow_backfill_provider.prepare.catalog import time_column_indexed

    sampled = None
    if (
        spec.chunk_by == "time"
        and granularity == "auto"
        and (tstats.rows is None or not time_stats.usable)
        and (sampled := _sample(spec, src_conn, table, key_col if key_is_int else None, notes)) is not None
    ):
        # never analyzed: a small sample stands in for the statistics, so the plan is the one ANALYZE would give
        tstats, time_stats = sampled.table, sampled.time
        if key_is_int and key_stats.correlation is None:
            key_stats = sampled.key

    def estimate(a: float, b: float) -> float:
        return (tstats.rows or 0.0) * time_stats.fraction(a, b)

    est_range = estimate(lo.timestamp(), hi.timestamp()) if tstats.rows is not None and time_stats.usable else None

    if spec.chunk_by == "key":
        if key_type is None:
            raise PlanError(f"key_column {key_col!r} is not a column of the source table {table}")
        if not key_is_int:
            raise PlanError(
                f"chunk_by: key needs an integer key_column; {key_col!r} of {table} is {key_type}: "
                "set key_column to an integer column (smallint, integer, bigint) or use chunk_by: time"
            )
        chunks = _key_chunks(spec, src_conn, table, key_col, key_stats, tstats, target, why, lo, hi, notes)
        return chunks, "key"

    if granularity == "auto":
        if est_range is None:
            notes.append(
                f"granularity auto: no statistics for {table}.{spec.time_column} and no usable sample of it (run "
                "ANALYZE on the source table); fell back to 'day'"
            )
            granularity = "day"
        else:
            chunks = sizing.auto_time_chunks(lo, hi, spec.timezone, estimate, target)
            if len(chunks) > spec.max_chunks:
                raise PlanError(f"auto sizing made {len(chunks)} chunks > max_chunks={spec.max_chunks}")
            key_indexed = key_is_int and time_column_indexed(src_conn, table, key_col)
            reason = sizing.prefer_key_ranges(
                n_time_chunks=len(chunks),
                est_rows=est_range,
                table_rows=tstats.rows,
                pages=tstats.pages,
                time_corr=time_stats.correlation,
                key_corr=key_stats.correlation if key_is_int else None,
                key_indexed=key_indexed,
                historical=bool(spec.historical),
                target=target,
                stats_label="sampled " if sampled else "pg_stats.",
            )
            if reason is not None:
                notes.append(f"granularity auto chose key ranges of {key_col}: {reason}")
                keyed = _key_chunks(spec, src_conn, table, key_col, key_stats, tstats, target, why, lo, hi, notes)
                return keyed, "key"
            notes.append(
                f"granularity auto: {len(chunks)} chunk(s) for ~{est_range:,.0f} estimated rows, about "
                f"{est_range / max(1, len(chunks)):,.0f} each ({why}; estimated from "
                f"{'a sample' if sampled else 'reltuples and the pg_stats histogram'} of {spec.time_column})"
            )
            _advise(
                spec,
                notes,
                "auto",
                chunks,
                est_range,
                target,
                tstats,
                time_stats,
                key_stats,
                key_is_int,
                src_conn,
                lo,
                hi,
            )
            return chunks, "auto"

    chunks = plan_chunks(lo, hi, granularity, spec.timezone, max_chunks=spec.max_chunks)
    _advise(
        spec, notes, granularity, chunks, est_range, target, tstats, time_stats, key_stats, key_is_int, src_conn, lo, hi
    )
    return chunks, granularity


def _key_chunks(spec, src_conn, table, key_col, key_stats, tstats, target, why, lo, hi, notes) -> list[Chunk]:
    """Half-open ranges of the integer ``key_col`` of about ``target`` rows each, bounded by ``[lo, hi)``."""
    from airflow_backfill_provider.prepare.catalog import time_column_indexed

    indexed = time_column_indexed(src_conn, table, key_col)
    if indexed:
        kmin, kmax = sourcestats.key_min_max(src_conn, table, key_col)
    else:
        notes.append(
            f"no index leads on {key_col}: every key chunk scans the whole table; index it (or use chunk_by: time)"
        )
        kmin, kmax = (
            (int(key_stats.bounds[0]), int(key_stats.bounds[-1])) if len(key_stats.bounds) >= 2 else (None, None)
        )
    cuts = [] if kmin is None or kmax is None else keyranges.boundaries(key_stats, kmin, kmax, tstats.rows, target)
    chunks = keyranges.plan_key_chunks(key_col, lo, hi, cuts, kmin)
    if len(chunks) > spec.max_chunks:
        raise PlanError(f"{len(chunks)} key ranges > max_chunks={spec.max_chunks}: raise target_chunk_rows")
    source = (
        ("the sampled histogram of " if key_stats.origin == "a sample" else "pg_stats histogram of ") + key_col
        if len(key_stats.bounds) >= 2
        else "an even split of the key span (no statistics: run ANALYZE on the source table)"
    )
    rows_from = "sampled rows" if key_stats.origin == "a sample" else "reltuples"
    notes.append(
        f"chunk_by key: {len(chunks)} range(s) of {key_col} from {kmin} to {kmax}, about "
        f"{(tstats.rows or 0) / len(chunks):,.0f} rows each by {source} and {rows_from}={tstats.rows if tstats.rows is None else round(tstats.rows)}; {why}; "
        f"each range also bounded by {spec.time_column} in [{lo.isoformat()}, {hi.isoformat()})"
    )
    return chunks


def _sample(spec: BackfillSpec, src_conn, table: TableName, key_col: str | None, notes: list[str]):
    """A bounded sample standing in for missing statistics (sourcestats.sample_stats), and a note saying so."""
    from airflow_backfill_provider.prepare.catalog import time_column_indexed

    indexed = time_column_indexed(src_conn, table, spec.time_column)
    s = sourcestats.sample_stats(
        src_conn, table, spec.time_column, key_col, timezone=spec.timezone, time_indexed=indexed
    )
    if s is None:
        return None
    corr = "unknown" if s.time.correlation is None else f"{s.time.correlation:.2f}"
    key = f", {key_col} correlation {s.key.correlation:.2f}" if key_col and s.key.correlation is not None else ""
    notes.append(
        f"granularity auto: {table} has no statistics (never analyzed), so the estimate was sampled: "
        f"{s.sampled_rows:,} rows from {s.sampled_pages:,} of its {s.table.pages:,} pages (TABLESAMPLE SYSTEM, "
        f"{s.seconds * 1000:,.0f} ms): ~{s.table.rows or 0:,.0f} rows, {spec.time_column} correlation {corr}{key}"
        f"{f', {spec.time_column} min/max from its index' if s.time_bounds_from_index else ''}. Run ANALYZE on "
        "the source table for the server's own statistics (the backfill never runs it: it does not write to the source)"
    )
    return s


def _advise(
    spec, notes, granularity, chunks, est_range, target, tstats, time_stats, key_stats, key_is_int, src_conn, lo, hi
):
    from airflow_backfill_provider.prepare.catalog import time_column_indexed

    key_indexed = key_is_int and time_column_indexed(src_conn, spec.source, spec.effective_key_column)
    notes.extend(
        sizing.advice(
            chunk_by="time",
            granularity=granularity,
            n_chunks=len(chunks),
            est_rows=est_range,
            target=target,
            pages=tstats.pages,
            time_corr=time_stats.correlation,
            key_corr=key_stats.correlation if key_is_int else None,
            key_indexed=key_indexed,
            time_column=spec.time_column,
            key_column=spec.effective_key_column if key_is_int else None,
            lo=lo,
            hi=hi,
            tz=spec.timezone,
            table_rows=tstats.rows,
        )
    )


def done_coverage(spec: BackfillSpec, dst_conn, *, backfill, run_id: str | None = None) -> coverage.Coverage:
    """What the ledger holds for this backfill (identity.BackfillIdentity); with ``run_id``, only what that
    run loaded."""
    rects = ledger.done_rects(
        dst_conn,
        TableName.parse(spec.ledger_table),
        backfill,
        key_column=spec.effective_key_column,
        run_id=run_id,
    )
    return coverage.Coverage(rects)


def is_done(done: coverage.Coverage, chunk: Chunk) -> bool:
    return done.covers(coverage.rect(chunk.start, chunk.end, chunk.key_lo, chunk.key_hi))
