"""Progress in the task logs: the plan states the whole plan's size and an estimate; each chunk its share.

Plan:  ``Plan size: 730 chunk(s) to load, 12 already done; ~2,190,000 rows (source planner estimate);
        ~1.9 h of chunk time at 320 rows/s per chunk measured by earlier chunks (less with parallel chunks)``
Chunk: ``chunk 212/730 committed; run: 300/730 chunks done (41%), 1,234,567 rows read; ETA 6 min``

Never fails a task: an estimate that cannot be had is logged as unknown. The chunk descriptor carries its
position ``i``/``n`` and the plan's row estimate ``est`` (three small ints).
"""

from __future__ import annotations

import logging
import time

from psycopg2 import sql

from airflow_backfill_provider.observe.progress import format_eta

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
    from airflow_backfill_provider.observe.progress import ledger_rate

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


def chunk_message(i: int | None, n: int | None, *, rows_done: int, chunks_done: int, est_rows: int | None = None,
                  elapsed_s: float | None) -> str:  # fmt: skip
    """``chunk 212/730 committed; run: 300/730 chunks done (41%), 1,234,567 rows read; ETA 6 min``.

    ``212/730`` is the chunk's position in the plan (the grid's order, not the order chunks finish in); the
    percentage is of the run's chunks committed so far (ledger rows of this run, this chunk included), so it only
    grows from one log line to the next whatever order parallel chunks finish in, and reaches 100% with the
    last one. Rows are a count (the planner's row estimate ``est_rows`` is an estimate: a share of it jumped
    and stopped short of 100%). ETA: chunks left at the run's pace so far.
    """
    pos = f"chunk {i}/{n} committed" if i and n else "chunk committed"
    if not n:
        return f"{pos}: {rows_done:,} rows read by this run so far"
    done = min(chunks_done, n)
    part = f"run: {done}/{n} chunks done ({done / n:.0%}), {rows_done:,} rows read"
    if done >= n:
        return f"{pos}; {part}; ETA done"
    eta = (n - done) * elapsed_s / done if elapsed_s and done else None
    return f"{pos}; {part}; ETA {format_eta(eta, 'no rate yet')}"


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


# ------------------------------------------------------------------------------------------ failures
#: the failures table: one row per (DAG, run, chunk), the chunk's last error; next to the ledger
_FAILURE_COLUMNS = sql.SQL(
    """dag_id       text        NOT NULL,
    run_id       text        NOT NULL,
    chunk_id     text        NOT NULL,
    map_index    integer,
    try_number   integer,
    final        boolean     NOT NULL,
    error_class  text,
    error        text        NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (dag_id, run_id, chunk_id)"""
)
#: the first line of an error, capped: what the page and ``status`` group by
ERROR_MAX_CHARS = 500


def failures_table(spec):
    """``<ledger>_failures`` in the ledger's schema, e.g. public.backfill_ledger_failures."""
    from airflow_backfill_provider.core.spec import TableName

    ledger = TableName.parse(spec.ledger_table)
    return TableName(schema_=ledger.schema_, name=f"{ledger.name}_failures")


def first_line(error: BaseException | str | None, chunk_id: str | None = None) -> str:
    """The first non-empty line of an error's message (its class name when it has none), capped.

    The provider's chunk errors start with ``chunk <id>: ``: that prefix is dropped (the page names the chunk
    next to it), so one cause on 90 chunks is one line with a count of 90, not 90 different lines."""
    text = str(error or "").strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if chunk_id and line.startswith(f"chunk {chunk_id}: "):
        line = line[len(f"chunk {chunk_id}: ") :]
    if not line:
        line = type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    return line if len(line) <= ERROR_MAX_CHARS else line[: ERROR_MAX_CHARS - 3] + "..."


def record_failure(context, *, final: bool | None = None) -> None:
    """Record a failed try of a chunk, the first line of its error, for the progress page and ``status``.

    An Airflow task callback (``on_failure_callback``: the last try failed; ``on_retry_callback``: it will be
    retried): the chunk operator registers it on itself (:func:`attach_failure_recorder`). Airflow 3's API
    server cannot read task logs cheaply (one remote read per task instance) and its metadata database keeps no
    error text, so the chunk writes it next to its ledger in the destination, in its own short transaction
    (never the chunk's, which is rolled back). Never raises: a failure to record is logged.
    """
    from airflow_backfill_provider.connections import close_all, connect
    from airflow_backfill_provider.core.spec import load_spec

    conn = None
    try:
        ti = context.get("ti") or context.get("task_instance")
        task = context.get("task") or getattr(ti, "task", None)
        if task is None:
            raise ValueError("no task in the callback's context")
        spec = load_spec(task.spec)
        chunk = task.chunk if isinstance(getattr(task, "chunk", None), dict) else {}
        error = context.get("exception")
        dag_id = getattr(ti, "dag_id", None) or spec.effective_dag_id
        run_id = getattr(context.get("dag_run"), "run_id", None) or context.get("run_id") or getattr(ti, "run_id", "")
        map_index = getattr(ti, "map_index", None)
        chunk_id = str(chunk.get("chunk_id") or getattr(ti, "rendered_map_index", None) or map_index)
        if final is None:
            final = getattr(ti, "state", None) not in ("up_for_retry",)
        table = failures_table(spec)
        conn = connect(spec.destination_conn_id, application_name=f"backfill:{dag_id}:{chunk_id}:failure",
                       statement_timeout_s=10, lock_timeout_s=5)  # fmt: skip
        from airflow_backfill_provider.core import ddl

        ddl.ensure_table(conn, table, _FAILURE_COLUMNS)
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    """INSERT INTO {t} (dag_id, run_id, chunk_id, map_index, try_number, final, error_class, error)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (dag_id, run_id, chunk_id) DO UPDATE SET map_index = EXCLUDED.map_index,
                           try_number = EXCLUDED.try_number, final = EXCLUDED.final,
                           error_class = EXCLUDED.error_class, error = EXCLUDED.error,
                           failed_at = EXCLUDED.failed_at"""
                ).format(t=sql.Identifier(*table.parts)),
                (dag_id, run_id, chunk_id, map_index, getattr(ti, "try_number", None), bool(final),
                 type(error).__name__ if error is not None else None, first_line(error, chunk_id)),
            )  # fmt: skip
        conn.commit()
    except Exception as err:  # noqa: BLE001 - best effort: never fails (or hides) the task's own error
        log.warning("Could not record the chunk's failure for the progress page (%s)", first_line(err))
    finally:
        close_all(conn)


def _record_final(context) -> None:
    record_failure(context, final=True)


def _record_retry(context) -> None:
    record_failure(context, final=False)


def attach_failure_recorder(operator) -> None:
    """Register :func:`record_failure` as the operator's failure and retry callback, after any the user set.

    Call it once at the end of the chunk operator's ``__init__`` (operators/chunk.py): Airflow runs these
    callbacks in the task's process on 3.x and 2.11 (``dag.test()`` too), with the error in ``context``.
    """
    for attr, callback in (("on_failure_callback", _record_final), ("on_retry_callback", _record_retry)):
        current = getattr(operator, attr, None)
        callbacks = list(current) if isinstance(current, (list, tuple)) else ([current] if current else [])
        if callback not in callbacks:
            setattr(operator, attr, [*callbacks, callback])
