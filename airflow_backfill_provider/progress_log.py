"""Progress in the task logs: the plan states the whole plan's size and an estimate; each chunk its share.

Plan:  ``Plan size: 730 chunk(s) to load, 12 already done; ~2,190,000 rows (source planner estimate);
        ~1.9 h of chunk time at 320 rows/s per chunk measured by earlier chunks (less with parallel chunks)``
Chunk: ``chunk 212/730, 41% of rows, ETA 6 min``

Never fails a task: an estimate that cannot be had is logged as unknown. The chunk descriptor carries its
position ``i``/``n`` and the plan's row estimate ``est`` (three small ints).
"""

from __future__ import annotations

import logging
import time

from psycopg2 import sql

from airflow_backfill_provider.progress import format_eta

log = logging.getLogger(__name__)


def estimate_rows(src_conn, spec, start, end) -> int | None:
    """The source planner's row estimate for ``[start, end)`` (EXPLAIN, no scan); None if unavailable.

    As ``rows(t < end) - rows(t < start)``: PostgreSQL 15 estimated the two-sided range at its 0.5% default
    (15 of 3000 rows for a third of the table) where each one-sided estimate used the histogram.
    """
    try:
        below = [_explain_rows(src_conn, spec, bound) for bound in (end, start)]
        src_conn.rollback()
        return max(0, below[0] - below[1])
    except Exception as err:  # an estimate only: never fail the plan for it  # noqa: BLE001 - best effort: never fails the task
        log.info("No row estimate for the plan (%s)", str(err).strip())
        try:
            src_conn.rollback()
        except Exception:  # noqa: BLE001 - best effort: never fails the task
            pass
        return None


def _explain_rows(conn, spec, bound) -> int:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {t} WHERE {c} < %s").format(
                t=sql.Identifier(*spec.source.parts), c=sql.Identifier(spec.time_column)
            ),
            (bound,),
        )
        doc = cur.fetchone()[0]
    if isinstance(doc, str):
        import json

        doc = json.loads(doc)
    return int(doc[0]["Plan"]["Plan Rows"])


def measured_rate(dst_conn, spec, backfill_key: str | None = None) -> float | None:
    """Rows per second per chunk measured by this backfill's chunks already in the ledger (every backfill's
    into the target without a key); None if none."""
    from airflow_backfill_provider.progress import ledger_rate

    try:
        return ledger_rate(dst_conn, spec, backfill_key)
    except Exception as err:  # noqa: BLE001 - best effort: never fails the task
        log.info("No measured rate from the ledger (%s)", str(err).strip())
        try:
            dst_conn.rollback()
        except Exception:  # noqa: BLE001 - best effort: never fails the task
            pass
        return None


def plan_message(n: int, skipped: int, est_rows: int | None, rate: float | None) -> str:
    msg = f"Plan size: {n} chunk(s) to load, {skipped} already done"
    msg += f"; ~{est_rows:,} rows (source planner estimate)" if est_rows is not None else "; rows unknown"
    if est_rows is not None and rate:
        msg += (
            f"; ~{format_eta(est_rows / rate)} of chunk time at {rate:,.0f} rows/s per chunk measured by earlier "
            "chunks (less with parallel chunks, more with Airflow's per-task overhead)"
        )
    else:
        msg += "; no earlier chunks to measure a rate from: the chunk logs give an ETA once some have loaded"
    return msg


def number(descriptors: list[dict], est_rows: int | None) -> list[dict]:
    """Add position ``i`` (1-based), total ``n`` and the plan's row estimate ``est`` to each descriptor."""
    n = len(descriptors)
    return [
        {**d, "i": k, "n": n, **({"est": est_rows} if est_rows is not None else {})}
        for k, d in enumerate(descriptors, 1)
    ]


def chunk_message(i: int | None, n: int | None, *, rows_done: int, chunks_done: int, est_rows: int | None,
                  elapsed_s: float | None) -> str:  # fmt: skip
    """``chunk 212/730, 41% of rows, ETA 6 min``: share of the whole run, ETA from its wall-clock rate."""
    pos = f"chunk {i}/{n}" if i and n else "chunk"
    if est_rows:
        share = min(1.0, rows_done / est_rows)
        part = f"{share:.0%} of rows"
        left = max(0, est_rows - rows_done)
        rate = rows_done / elapsed_s if elapsed_s and elapsed_s > 0 and rows_done else None
        eta = left / rate if rate else None
    elif n:
        share = min(1.0, chunks_done / n)
        part = f"{share:.0%} of chunks"
        eta = (n - chunks_done) * elapsed_s / chunks_done if elapsed_s and chunks_done else None
    else:
        return f"{pos}: {rows_done:,} rows loaded by this run so far"
    if share >= 1.0:
        return f"{pos}, {part}, ETA done"
    return f"{pos}, {part}, ETA {format_eta(eta, 'no rate yet')}"


def log_chunk_share(task_log, descriptor: dict, *, totals: tuple[int, int] | None, run_started_at) -> None:
    """After a chunk commits: log the share line from this run's ledger totals (read in the chunk's own
    transaction, transfer.ChunkResult.run_totals: no extra session or query here)."""
    if totals is None:
        task_log.info("No progress line for this chunk (no run id)")
        return
    chunks_done, rows_done = totals
    elapsed = time.time() - run_started_at.timestamp() if run_started_at is not None else None
    task_log.info(
        "%s",
        chunk_message(
            descriptor.get("i"),
            descriptor.get("n"),
            rows_done=rows_done,
            chunks_done=chunks_done,
            est_rows=descriptor.get("est"),
            elapsed_s=elapsed,
        ),
    )
