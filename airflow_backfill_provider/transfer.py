"""One chunk: stream source rows into a destination staging table, upsert newer-wins, record the ledger.

    source  --COPY (SELECT ...) TO STDOUT-->  os.pipe  --COPY stage FROM STDIN-->  destination
                                                        then INSERT ... ON CONFLICT (newer wins)
                                                        then ledger row, then COMMIT

Memory is flat whatever the chunk size: rows are never in Python lists, only in the pipe's buffers.
Everything in the destination happens in ONE transaction under a transaction-scoped advisory lock
for the chunk, so a failure anywhere leaves no rows and no ledger entry, and two runs of the same
chunk at once are serialized.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field

import psycopg2

from airflow_backfill_provider import castcheck, ledger, schema, swap
from airflow_backfill_provider import sql as q
from airflow_backfill_provider.chunks import Chunk
from airflow_backfill_provider.connections import close_all, connect, rollback_quietly
from airflow_backfill_provider.errors import classify
from airflow_backfill_provider.exceptions import PermanentChunkError, TransientChunkError
from airflow_backfill_provider.interrupts import InterruptCatchingReader, is_interrupt
from airflow_backfill_provider.spec import BackfillSpec, TableName

log = logging.getLogger(__name__)

_PIPE_BUFFER = 1 << 20  # 1 MiB user-space buffer on each side of the pipe: few syscalls, flat memory
_STAGE = "backfill_stage"


@dataclass
class ChunkResult:
    chunk_id: str
    start: str
    end: str
    rows_extracted: int
    inserted: int
    updated: int
    unchanged: int
    seconds: float
    decisions: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows_extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows_per_s"] = round(self.rows_per_s, 1)
        return d


def application_name(dag_id: str, chunk_id: str) -> str:
    """What a DBA sees in pg_stat_activity; the throttle excludes sessions with this prefix."""
    return f"backfill:{dag_id}:{chunk_id}"


def source_for(spec: BackfillSpec, chunk: Chunk) -> tuple[TableName, dict[str, str]]:
    """Historical mode: the first range whose ``until`` is after the chunk start decides table/expressions."""
    for rng in spec.historical:
        from airflow_backfill_provider.chunks import to_datetime

        if chunk.start < to_datetime(rng.until, spec.timezone, what="historical.until"):
            table = TableName.parse(rng.source_table) if rng.source_table else spec.source
            return table, dict(rng.column_expressions)
    return spec.source, {}


def prepare(spec: BackfillSpec, src_conn, dst_conn, chunk: Chunk) -> tuple[TableName, schema.ColumnPlan]:
    """Catalog checks before any write: tables, columns, unique key; then what to select."""
    target = spec.staging_target
    dest_cols, dest_keys = schema.describe_table(dst_conn, target, side="destination")
    schema.check_destination(spec, dest_cols, dest_keys, target)
    src_table, expressions = source_for(spec, chunk)
    src_cols, _ = schema.describe_table(src_conn, src_table, side="source")
    return src_table, schema.plan_columns(spec, dest_cols, src_cols, expressions=expressions)


class _Writer(threading.Thread):
    """Runs the source COPY TO into the pipe; stores its error for the main thread to raise."""

    def __init__(self, cursor, statement, fd: int):
        super().__init__(daemon=True, name="backfill-copy-out")
        self.cursor, self.statement, self.fd = cursor, statement, fd
        self.error: BaseException | None = None
        self.rows = -1

    def run(self):
        out = os.fdopen(self.fd, "wb", buffering=_PIPE_BUFFER)
        try:
            self.cursor.copy_expert(self.statement, out, size=_PIPE_BUFFER)
            self.rows = self.cursor.rowcount
        except BaseException as err:  # noqa: BLE001 - re-raised by the main thread
            self.error = err  # recorded BEFORE the pipe closes: the reader's EOF never outruns the error
        finally:
            try:
                out.close()
            except BaseException as err:  # noqa: BLE001 - e.g. EPIPE when the reader is gone
                self.error = self.error or err


def stream_copy(src_conn, dst_cur, copy_out_sql, copy_in_sql) -> tuple[int, int]:
    """Pipe the source COPY into the destination COPY; returns (rows read, rows written)."""
    r, w = os.pipe()
    writer = _Writer(src_conn.cursor(), copy_out_sql, w)
    writer.start()
    reader = InterruptCatchingReader(os.fdopen(r, "rb", buffering=_PIPE_BUFFER))
    try:
        dst_cur.copy_expert(copy_in_sql, reader, size=_PIPE_BUFFER)
        reader.close()
        writer.join()
    except BaseException as err:
        # If the source failed first (e.g. statement_timeout before the first row), the destination only
        # saw a cut stream ("COPY file signature not recognized"): the source's error is the real one.
        source_error = writer.error
        reader.close()  # writer then fails with EPIPE instead of blocking forever
        try:
            src_conn.cancel()
        except Exception:  # noqa: BLE001 - best effort; the connection is closed by the caller
            pass
        writer.join(timeout=30)
        # an interrupt (execution_timeout, SIGTERM) inside read() reaches us as QueryCanceled: raise the interrupt
        interrupt = reader.interrupt or (err if is_interrupt(err) else None)
        if interrupt is not None:
            raise interrupt from None  # the driver error that wraps it is noise
        if source_error is not None:
            raise source_error from err
        raise
    if writer.error is not None:
        # A source that died mid-stream can look like a clean EOF to the destination COPY: never commit then.
        raise writer.error
    written = dst_cur.rowcount
    if writer.rows >= 0 and written >= 0 and writer.rows != written:
        raise TransientChunkError(f"source sent {writer.rows} rows but staging received {written}; not committed")
    return writer.rows, written


def _explain_cast_failure(spec, chunk, source, appname, src_table, plan):
    """Name the column, row and value behind a data error (SQLSTATE 22xxx); None if not found."""
    conn = None
    try:
        conn = connect(
            source or spec.source_conn_id, application_name=f"{appname}:castcheck", readonly=True,
            statement_timeout_s=spec.statement_timeout_s, lock_timeout_s=spec.lock_timeout_s,
        )
        return castcheck.find_cast_failure(conn, src_table, plan, spec.key_columns, chunk.start, chunk.end)
    except Exception:  # noqa: BLE001 - diagnosis is best effort; the original error is raised anyway
        log.warning("chunk %s: could not locate the value behind the data error", chunk.chunk_id, exc_info=True)
        return None
    finally:
        close_all(conn)


def upsert_counted(cur, target: TableName, stage: str, columns, keys, version_column, conflict_policy) -> tuple[int, int]:
    """Run the newer-wins upsert from ``stage``; return (inserted, updated), read from the transaction's
    own per-table counters before and after it (free, and right for partitioned targets too)."""
    counters = {"table": q.ident(target).as_string(cur)}
    cur.execute(q.xact_write_counts(), counters)
    ins0, upd0 = cur.fetchone()
    cur.execute(q.upsert(target, stage, columns, keys, version_column, conflict_policy))
    cur.execute(q.xact_write_counts(), counters)
    ins1, upd1 = cur.fetchone()
    return ins1 - ins0, upd1 - upd0


def open_source(spec: BackfillSpec, appname: str, source: str | None = None):
    """The chunk's source session: read-only, with the spec's statement and lock timeouts."""
    return connect(
        source or spec.source_conn_id,
        application_name=appname,
        readonly=True,
        statement_timeout_s=spec.statement_timeout_s,
        lock_timeout_s=spec.lock_timeout_s,
    )


def transfer_chunk(
    spec: BackfillSpec,
    chunk: Chunk,
    *,
    source: str | None = None,
    destination: str | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    source_conn=None,
) -> ChunkResult:
    """Load one chunk. Idempotent: a rerun of an unchanged chunk rewrites 0 rows.

    ``source``/``destination`` default to the spec's Airflow connection ids; DSN URLs work too.
    ``source_conn``: a session from :func:`open_source` that the caller already used (the operator's
    load probe), so a chunk opens one source session, not two; it is closed here either way.
    Raises TransientChunkError (retry) or PermanentChunkError (fix the spec/tables first).
    """
    dag_id = dag_id or spec.effective_dag_id
    appname = application_name(dag_id, chunk.chunk_id)
    t0 = time.monotonic()
    src_conn, dst_conn = source_conn, None
    src_table = plan = None
    try:
        if src_conn is None:
            src_conn = open_source(spec, appname, source)
        dst_conn = connect(destination or spec.destination_conn_id, application_name=appname, lock_timeout_s=spec.lock_timeout_s)
        # pre-flight (catalog reads only) before the first write, the ledger DDL: a bad spec writes nothing
        # (swap mode: checked against the live table, which the parallel one is created LIKE)
        src_table, plan = prepare(swap.as_live(spec), src_conn, dst_conn, chunk)
        ledger_table = TableName.parse(spec.ledger_table)
        ledger.ensure_table(dst_conn, ledger_table)
        if spec.mode == "swap":
            swap.ensure_parallel_table(dst_conn, spec)  # <table>_backfill, if not there yet
            src_table, plan = prepare(spec, src_conn, dst_conn, chunk)  # its own columns, if it predates a change
        target = spec.staging_target
        select = q.chunk_select(src_table, plan.select_exprs, plan.time_filter, chunk.start, chunk.end)
        with dst_conn.cursor() as cur:
            cur.execute(q.advisory_xact_lock(), (f"{target}|{chunk.start.isoformat()}|{chunk.end.isoformat()}",))
            cur.execute(q.create_staging(_STAGE, target, plan.columns))
            extracted, staged = stream_copy(
                src_conn,
                cur,
                q.copy_out(select, spec.copy_format),
                q.copy_in(_STAGE, plan.columns, spec.copy_format),
            )
            inserted, updated = upsert_counted(
                cur, target, _STAGE, plan.columns, spec.key_columns, spec.version_column, spec.conflict_policy
            )
            seconds = time.monotonic() - t0
            stats = {
                "extracted": staged,
                "inserted": inserted,
                "updated": updated,
                "unchanged": staged - inserted - updated,
                "seconds": seconds,
            }
            ledger.record(
                cur, ledger_table, target=str(target), chunk_id=chunk.chunk_id, start=chunk.start,
                end=chunk.end, stats=stats, dag_id=dag_id, run_id=run_id,
            )
        dst_conn.commit()
        try:
            src_conn.rollback()  # read-only transaction: nothing to keep
        except psycopg2.Error:  # the chunk is committed; a source gone now changes nothing
            pass
        return ChunkResult(
            chunk_id=chunk.chunk_id, start=chunk.start.isoformat(), end=chunk.end.isoformat(),
            rows_extracted=staged, inserted=inserted, updated=updated, unchanged=staged - inserted - updated,
            seconds=time.monotonic() - t0, decisions=plan.decisions,
        )
    except BaseException as err:
        rollback_quietly(dst_conn)
        if is_interrupt(err):  # execution_timeout, SIGTERM, SIGINT: rolled back; Airflow retries it as it is
            raise
        if plan is not None and str(getattr(err, "pgcode", "") or "").startswith("22"):
            found = _explain_cast_failure(spec, chunk, source, appname, src_table, plan)
            if found is not None:
                raise PermanentChunkError(found.describe(chunk.chunk_id, spec.key_columns)) from err
        raise classify(
            err, chunk_id=chunk.chunk_id, source_conn=src_conn, statement_timeout_s=spec.statement_timeout_s
        ) from err
    finally:
        close_all(src_conn, dst_conn)
