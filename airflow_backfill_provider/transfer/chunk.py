"""One chunk: stream source rows into a destination staging table, upsert newer-wins, record the ledger.

    source  --COPY (SELECT ...) TO STDOUT-->  os.pipe  --COPY stage FROM STDIN-->  destination
                                                        then INSERT ... ON CONFLICT (newer wins)
                                                        then ledger row, then COMMIT

The steps have their own modules: what the chunk runs with (prepare/facts.py: the plan's prepared run after one
fingerprint statement per side, or prepared here), the COPY pipe (transfer/pipe.py), the first load (transfer/firstload.py),
the upsert (transfer/upsert.py), the ledger row (ledger/table.py); this one orchestrates them for one chunk.
Everything in the destination happens in ONE transaction under a transaction-scoped advisory lock
for the chunk, so a failure anywhere leaves no rows and no ledger entry, and two runs of the same
chunk at once are serialized.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from airflow_backfill_provider.core import timebounds
from airflow_backfill_provider.ledger import table as ledger
from airflow_backfill_provider.plan import keyranges
from airflow_backfill_provider.prepare import facts
from airflow_backfill_provider.transfer import castcheck, encoding, firstload
from airflow_backfill_provider.core import sql as q
from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.connections import (
    application_name,
    close_all,
    open_destination,
    open_source,
    rollback_quietly,
)
from airflow_backfill_provider.core.errors import classify
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.core.interrupts import is_interrupt
from airflow_backfill_provider.transfer.pipe import stream_copy
from airflow_backfill_provider.prepare.source import source_for
from airflow_backfill_provider.core.spec import BackfillSpec, TableName
from airflow_backfill_provider.throttle.probe import read_watch
from airflow_backfill_provider.transfer.upsert import upsert_counted

log = logging.getLogger(__name__)

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
    run_totals: tuple[int, int] | None = None  # (chunks, rows) of this run in the ledger, this chunk included
    #: the read paused by the source's load while it ran (throttle.ReadWatch): how often, how long in all
    read_pauses: int = 0
    paused_s: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows_extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows_per_s"] = round(self.rows_per_s, 1)
        return d


def _diagnose(what: str, spec: BackfillSpec, chunk: Chunk, source: str | None, appname: str, rd, find):
    """Run ``find(conn, lo, hi)`` on a fresh source session over the chunk's range (the chunk's own session
    is in an unknown state after the error); None if that fails too: diagnosis is best effort, the
    original error is raised anyway."""
    conn = None
    try:
        conn = open_source(spec, f"{appname}:{what}", source)
        lo, hi = timebounds.bounds(rd.plan.filter_kind, chunk.start, chunk.end, spec.timezone)
        return find(conn, lo, hi)
    except Exception:  # noqa: BLE001 - see above
        log.warning("chunk %s: could not locate the value behind the error (%s)", chunk.chunk_id, what, exc_info=True)
        return None
    finally:
        close_all(conn)


def _explain_cast_failure(spec, chunk, source, appname, rd):
    """Name the column, row and value behind a data error (SQLSTATE 22xxx, 0A000); None if not found."""
    return _diagnose(
        "castcheck",
        spec,
        chunk,
        source,
        appname,
        rd,
        lambda conn, lo, hi: castcheck.find_cast_failure(conn, rd.src_table, rd.plan, spec.key_columns, lo, hi),
    )


def _explain_encoding_error(err, spec, chunk, source, dst_conn, appname, rd) -> str:
    """Name the column (and key) of a value the destination's encoding cannot hold; see transfer/encoding.py."""
    dst_encoding = dst_conn.info.parameter_status("server_encoding") or "?"
    found = _diagnose(
        "encoding",
        spec,
        chunk,
        source,
        appname,
        rd,
        lambda conn, lo, hi: encoding.describe(
            err,
            chunk_id=chunk.chunk_id,
            dst_encoding=dst_encoding,
            src_conn=conn,
            select=q.chunk_select(rd.src_table, rd.plan.copy_exprs, rd.plan.time_filter, lo, hi),
            columns=rd.plan.columns,
            keys=spec.key_columns,
        ),
    )
    # without the row, the column from the error context is enough
    return found or encoding.describe(err, chunk_id=chunk.chunk_id, dst_encoding=dst_encoding, columns=rd.plan.columns)


@dataclass
class RunInfo:
    """Where a chunk runs, for its ledger row: the DAG run, and the deferred waits before this load (the
    progress page shows them)."""

    dag_id: str | None = None
    run_id: str | None = None
    waited_load_s: float | None = None
    waited_pacing_s: float | None = None


@dataclass
class Sessions:
    """A task instance's two sessions, kept for its chunks (the caller closes them; after a chunk's error
    they are closed, so check ``usable``), and what they hold between chunks. ``batch``: the chunks of a
    batch keep one staging table (a CREATE and DROP of a temp table per chunk cost about a third of a small
    chunk) and the checked prepared run per source range."""

    source: Any
    destination: Any
    batch: bool = False
    stage: tuple | None = None  # shape of the staging table kept on ``destination``
    checked: dict[str, facts.Ready] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return not (self.source is None or self.source.closed or self.destination is None or self.destination.closed)


def transfer_chunk(
    spec: BackfillSpec,
    chunk: Chunk,
    *,
    run: RunInfo | None = None,
    sessions: Sessions | None = None,
    prepared: facts.PreparedRun | None = None,
    source: str | None = None,
    destination: str | None = None,
) -> ChunkResult:
    """Load one chunk. Idempotent: a rerun of an unchanged chunk rewrites 0 rows.

    ``prepared``: the plan's prepared run (prepare/facts.py), used after one fingerprint statement per side; without
    it the chunk prepares itself. ``sessions``: the task instance's (the load probe used its source one),
    else opened and closed here, on ``source``/``destination`` (connection ids or DSNs; the spec's by
    default). Raises TransientChunkError (retry) or PermanentChunkError (fix the spec/tables first).
    """
    run = run or RunInfo()
    dag_id = run.dag_id or spec.effective_dag_id
    appname = application_name(dag_id, chunk.chunk_id)
    t0 = time.monotonic()
    own = sessions is None
    s = sessions or Sessions(None, None)
    rd: facts.Ready | None = None
    # watches the source while the chunk reads, pausing the read under load (throttle.ReadWatch); None when off
    watch = read_watch(spec, appname, source=source, destination=destination, label=f"chunk {chunk.chunk_id}")
    try:
        if own:
            s.source = open_source(spec, appname, source)
            s.destination = open_destination(spec, appname, destination)
        rd = s.checked.get(facts.key(spec, chunk))  # a batch checks each source range once
        if rd is None:
            rd = facts.ready(spec, chunk, s.source, s.destination, prepared, source=source)
            if s.batch:
                s.checked[facts.key(spec, chunk)] = rd
        with s.destination.cursor() as cur:
            # the same backfill's runs of this range serialize; another backfill into the table does not wait
            lock = q.advisory_xact_lock_of(rd.backfill.lock_key(chunk.start, chunk.end) + keyranges.lock_suffix(chunk))
            staged, inserted, updated = _load(cur, spec, chunk, s, rd, watch, lock)
            paused_s = watch.paused_s if watch is not None else 0.0
            if watch is not None and (watch.checks or watch.pauses or watch.errors):
                log.info("chunk %s: %s", chunk.chunk_id, watch.describe())
            counts = (staged, inserted, updated)
            totals = _record(cur, spec, chunk, rd, run, dag_id, counts, time.monotonic() - t0, paused_s)
        s.destination.commit()
        try:
            s.source.rollback()  # read-only transaction: nothing to keep
        except psycopg2.Error:  # the chunk is committed; a source gone now changes nothing
            pass
        return ChunkResult(
            chunk_id=chunk.chunk_id,
            start=chunk.start.isoformat(),
            end=chunk.end.isoformat(),
            rows_extracted=staged,
            inserted=inserted,
            updated=updated,
            unchanged=staged - inserted - updated,
            seconds=time.monotonic() - t0,
            decisions=rd.plan.decisions,
            run_totals=totals,
            read_pauses=watch.pauses if watch is not None else 0,
            paused_s=round(paused_s, 3),
        )
    except BaseException as err:
        rollback_quietly(s.destination)
        error = _chunk_error(err, spec, chunk, source, s, appname, rd)
        close_all(s.source, s.destination)  # their state is unknown: the staging table and checks go with them
        s.stage, s.checked = None, {}
        if error is err:  # an interrupt (execution_timeout, SIGTERM): rolled back; Airflow retries it as it is
            raise
        raise error from err
    finally:
        if own:
            close_all(s.source, s.destination)


def _record(cur, spec, chunk: Chunk, rd: facts.Ready, run: RunInfo, dag_id: str, counts, seconds, paused_s):
    """The chunk's ledger row, in its transaction; the run's (chunks, rows) so far when it has a run id."""
    staged, inserted, updated = counts
    ledger_table = TableName.parse(spec.ledger_table)
    ledger.record(
        cur,
        ledger_table,
        backfill=rd.backfill,
        chunk_id=chunk.chunk_id,
        start=chunk.start,
        end=chunk.end,
        stats={
            "extracted": staged,
            "inserted": inserted,
            "updated": updated,
            "unchanged": staged - inserted - updated,
            "seconds": seconds,
        },
        dag_id=dag_id,
        run_id=run.run_id,
        key_column=chunk.key_column,
        key_lo=chunk.key_lo,
        key_hi=chunk.key_hi,
        # a pause of the read is a wait for the load too: the ledger's figure counts it
        waited_load_s=(run.waited_load_s or 0.0) + paused_s if paused_s > 0 else run.waited_load_s,
        waited_pacing_s=run.waited_pacing_s,
    )
    if not run.run_id:
        return None
    return ledger.run_totals(cur, ledger_table, rd.backfill.target, run.run_id, dag_id=dag_id)


def _load(cur, spec, chunk: Chunk, s: Sessions, rd: facts.Ready, watch, lock) -> tuple[int, int, int]:
    """The chunk's rows into the target, in the destination transaction of ``cur``, under ``lock`` (the
    chunk's advisory lock, sent with its first statement): straight in on a first load (transfer/firstload.py), else
    through the staging table and the newer-wins upsert. (staged, inserted, updated)"""
    target, plan = spec.staging_target, rd.plan
    lo, hi = timebounds.bounds(plan.filter_kind, chunk.start, chunk.end, spec.timezone)
    select = q.chunk_select(rd.src_table, plan.copy_exprs, plan.time_filter, lo, hi)
    if chunk.keyed:  # chunk_by: key: AND key >= lo AND key < hi (plan/keyranges.py), on the chunk's key expression
        select = select + keyranges.key_filter(chunk, source_for(spec, chunk)[1])
    copy_out = q.copy_out(select, spec.copy_format)
    first, row = [lock], None  # first: statements sent in one round trip with the next one
    check = firstload.empty_check(cur, target, spec, chunk, plan) if not s.batch and firstload.eligible(plan) else None
    if check is not None:
        # lock, savepoint (for a first load that meets a key after all) and check in one round trip
        cur.execute(sql.SQL("; ").join([lock, sql.SQL("SAVEPOINT {}").format(firstload.SAVEPOINT), check]))
        row, first = cur.fetchone(), []
    if row and row[0]:  # nothing of the range in the target: COPY straight into it
        try:
            _, staged = stream_copy(
                s.source, cur, copy_out, q.copy_in(target, plan.columns, spec.copy_format), gate=watch
            )
            return staged, staged, 0
        except psycopg2.errors.UniqueViolation:
            # a row with one of the keys is there after all: newer-wins through the staging path
            cur.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(firstload.SAVEPOINT))
            s.source.rollback()
            log.info("chunk %s: a key of the range is in the target already; upserting", chunk.chunk_id)
    shape = (str(target), tuple(plan.columns), tuple(plan.stage_types))
    if not s.batch:
        first.append(q.create_staging(_STAGE, target, plan.columns, plan.stage_types))
    elif s.stage != shape:  # a batch keeps one staging table per session, emptied at each commit
        if s.stage is not None:
            first.append(q.drop_table(TableName(name=_STAGE)))
        first.append(q.create_staging(_STAGE, target, plan.columns, plan.stage_types, keep=True))
        s.stage = shape
    if first:
        cur.execute(sql.SQL("; ").join(first))
    _, staged = stream_copy(s.source, cur, copy_out, q.copy_in(_STAGE, plan.columns, spec.copy_format), gate=watch)
    castcheck.check_rounding(cur, plan, _STAGE, spec.key_columns, f"chunk {chunk.chunk_id}")
    inserted, updated = castcheck.upsert_naming_bad_values(
        cur,
        plan,
        _STAGE,
        spec.key_columns,
        chunk.chunk_id,
        lambda: upsert_counted(
            cur, target, _STAGE, plan.columns, spec.key_columns, spec.version_column, spec.conflict_policy, plan
        ),
    )
    return staged, inserted, updated


def _chunk_error(err: BaseException, spec, chunk, source, s: Sessions, appname, rd) -> BaseException:
    """What a failed chunk raises: an interrupt unchanged; a data error naming the column, row and value;
    else classified (core/errors.py), before its sessions are closed (a broken one makes an error transient)."""
    if is_interrupt(err):
        return err
    code = str(getattr(err, "pgcode", "") or "")
    if rd is not None and code in encoding.ENCODING_ERRORS:
        return PermanentChunkError(_explain_encoding_error(err, spec, chunk, source, s.destination, appname, rd))
    if rd is not None and (code.startswith("22") or code == "0A000"):  # 0A000: e.g. NaN -> integer
        found = _explain_cast_failure(spec, chunk, source, appname, rd)
        if found is not None:
            return PermanentChunkError(found.describe(chunk.chunk_id, spec.key_columns))
    return classify(
        err,
        chunk_id=chunk.chunk_id,
        source_conn=s.source,
        statement_timeout_s=spec.statement_timeout_s,
        conns=(s.destination,),
    )
