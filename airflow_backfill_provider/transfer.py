"""One chunk: stream source rows into a destination staging table, upsert newer-wins, record the ledger.

    source  --COPY (SELECT ...) TO STDOUT-->  os.pipe  --COPY stage FROM STDIN-->  destination
                                                        then INSERT ... ON CONFLICT (newer wins)
                                                        then ledger row, then COMMIT

The steps have their own modules: what the range reads (source.py), the COPY pipe (pipe.py), the
upsert (upsert.py), the ledger row (ledger.py); this one orchestrates them for one chunk.
Everything in the destination happens in ONE transaction under a transaction-scoped advisory lock
for the chunk, so a failure anywhere leaves no rows and no ledger entry, and two runs of the same
chunk at once are serialized.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from airflow_backfill_provider import (
    castcheck,
    encoding,
    facts,
    firstload,
    identity,
    keyranges,
    ledger,
    swap,
    timebounds,
)
from airflow_backfill_provider import sql as q
from airflow_backfill_provider.chunks import Chunk
from airflow_backfill_provider.connections import (
    application_name,
    close_all,
    open_destination,
    open_source,
    rollback_quietly,
)
from airflow_backfill_provider.errors import classify
from airflow_backfill_provider.exceptions import PermanentChunkError
from airflow_backfill_provider.interrupts import is_interrupt
from airflow_backfill_provider.pipe import stream_copy
from airflow_backfill_provider.source import source_for, source_range
from airflow_backfill_provider.spec import BackfillSpec, TableName
from airflow_backfill_provider.throttle import read_watch
from airflow_backfill_provider.upsert import upsert_counted

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


def _diagnose(what: str, spec: BackfillSpec, chunk: Chunk, source: str | None, appname: str, plan, find):
    """Run ``find(conn, lo, hi)`` on a fresh source session over the chunk's range (the chunk's own session
    is in an unknown state after the error); None if that fails too: diagnosis is best effort, the
    original error is raised anyway."""
    conn = None
    try:
        conn = open_source(spec, f"{appname}:{what}", source)
        lo, hi = timebounds.bounds(plan.filter_kind, chunk.start, chunk.end, spec.timezone)
        return find(conn, lo, hi)
    except Exception:  # noqa: BLE001 - see above
        log.warning("chunk %s: could not locate the value behind the error (%s)", chunk.chunk_id, what, exc_info=True)
        return None
    finally:
        close_all(conn)


def _explain_cast_failure(spec, chunk, source, appname, src_table, plan):
    """Name the column, row and value behind a data error (SQLSTATE 22xxx, 0A000); None if not found."""
    return _diagnose(
        "castcheck",
        spec,
        chunk,
        source,
        appname,
        plan,
        lambda conn, lo, hi: castcheck.find_cast_failure(conn, src_table, plan, spec.key_columns, lo, hi),
    )


def _explain_encoding_error(err, spec, chunk, source, dst_conn, appname, src_table, plan) -> str:
    """Name the column (and key) of a value the destination's encoding cannot hold; see encoding.py."""
    dst_encoding = dst_conn.info.parameter_status("server_encoding") or "?"
    found = _diagnose(
        "encoding",
        spec,
        chunk,
        source,
        appname,
        plan,
        lambda conn, lo, hi: encoding.describe(
            err,
            chunk_id=chunk.chunk_id,
            dst_encoding=dst_encoding,
            src_conn=conn,
            select=q.chunk_select(src_table, plan.copy_exprs, plan.time_filter, lo, hi),
            columns=plan.columns,
            keys=spec.key_columns,
        ),
    )
    # without the row, the column from the error context is enough
    return found or encoding.describe(err, chunk_id=chunk.chunk_id, dst_encoding=dst_encoding, columns=plan.columns)


def transfer_chunk(
    spec: BackfillSpec,
    chunk: Chunk,
    *,
    source: str | None = None,
    destination: str | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    source_conn=None,
    destination_conn=None,
    prepared: dict | None = None,
    close: bool = True,
    waited_load_s: float | None = None,
    waited_pacing_s: float | None = None,
    backfill: identity.BackfillIdentity | None = None,
    catalog: dict | None = None,
) -> ChunkResult:
    """Load one chunk. Idempotent: a rerun of an unchanged chunk rewrites 0 rows.

    ``source``/``destination`` default to the spec's Airflow connection ids; DSN URLs work too.
    ``source_conn``/``destination_conn``: sessions the caller opened (the chunk operator's, whose load
    probe used the source one), so a task instance opens one session per side; closed here unless
    ``close=False`` keeps them for the next chunk. On an error both are closed anyway (their state is
    unknown), so check ``.closed`` before reusing them.
    Raises TransientChunkError (retry) or PermanentChunkError (fix the spec/tables first).

    Batches (batches.py) pass a ``prepared`` dict too, which caches the catalog checks per source and
    keeps one staging table per session.

    ``waited_load_s``/``waited_pacing_s``: the operator's deferred waits before this load, kept in the ledger
    row for the progress page.
    ``backfill``: the run's identity resolved by the plan (identity.carried); resolved here when None.
    ``catalog``: the catalog facts the plan carried (facts.py): used after one fingerprint check per side,
    else the catalogs are read here.
    """
    dag_id = dag_id or spec.effective_dag_id
    appname = application_name(dag_id, chunk.chunk_id)
    t0 = time.monotonic()
    src_conn, dst_conn = source_conn, destination_conn
    src_table = plan = None
    ok = False
    # watches the source while the chunk reads, pausing the read under load (throttle.ReadWatch); None when off
    watch = read_watch(spec, appname, source=source, destination=destination, label=f"chunk {chunk.chunk_id}")
    try:
        if src_conn is None:
            src_conn = open_source(spec, appname, source)
        if dst_conn is None:
            dst_conn = open_destination(spec, appname, destination)
        ledger_table = TableName.parse(spec.ledger_table)
        cache_key = source_range(spec, chunk)
        carried = facts.usable(spec, chunk, catalog) if backfill is not None else None
        if prepared is not None and cache_key in prepared:
            src_table, plan, backfill = prepared[cache_key]  # same source range earlier in this batch: checked
        elif (
            carried is not None
            and (
                checked := facts.verify(
                    carried, src_conn, dst_conn, source_for(spec, chunk)[0], spec.staging_target, ledger_table
                )
            )[0]
        ):
            # the plan's catalog facts, both fingerprints unchanged: no catalog reads (facts.py)
            src_table, plan = facts.plan_from(spec, carried, chunk)
            log.debug("chunk %s: the plan's catalog facts, both tables unchanged since", chunk.chunk_id)
            if not checked[1]:
                ledger.ensure_table(dst_conn, ledger_table)
        else:
            if carried is not None:
                log.info("chunk %s: a table changed since the plan; reading the catalogs again", chunk.chunk_id)
            # pre-flight (catalog reads only) before the first write, the ledger DDL: a bad spec writes nothing
            # (swap mode: checked against the live table, which the parallel one is created LIKE)
            src_table, plan = facts.prepare(swap.as_live(spec), src_conn, dst_conn, chunk)
            if spec.mode == "swap":
                # <table>_backfill, if not there yet; refuses one the provider did not create (before any write)
                swap.ensure_parallel_table(dst_conn, spec)
                src_table, plan = facts.prepare(
                    spec, src_conn, dst_conn, chunk
                )  # its own columns, if it predates a change
            backfill = backfill or identity.of(spec, src_conn, dst_conn, source_conn_id=source)
            ledger.ensure_table(dst_conn, ledger_table)
        assert backfill is not None  # given, cached or resolved above
        if prepared is not None:
            prepared[cache_key] = (src_table, plan, backfill)
        target = spec.staging_target
        lo, hi = timebounds.bounds(plan.filter_kind, chunk.start, chunk.end, spec.timezone)
        select = q.chunk_select(src_table, plan.copy_exprs, plan.time_filter, lo, hi)
        if chunk.keyed:  # chunk_by: key: AND key >= lo AND key < hi (keyranges.py), on the chunk's key expression
            select = select + keyranges.key_filter(chunk, source_for(spec, chunk)[1])
        with dst_conn.cursor() as cur:
            # the same backfill's runs of this range serialize; another backfill into the table does not wait
            cur.execute(
                q.advisory_xact_lock(), (backfill.lock_key(chunk.start, chunk.end) + keyranges.lock_suffix(chunk),)
            )
            copy_out = q.copy_out(select, spec.copy_format)
            direct = prepared is None and firstload.eligible(plan)
            direct = direct and firstload.range_is_empty(cur, target, spec, chunk, plan)
            if direct:  # nothing of the range in the target: COPY straight into it (firstload.py)
                cur.execute(sql.SQL("SAVEPOINT {}").format(firstload.SAVEPOINT))
                try:
                    extracted, staged = stream_copy(
                        src_conn, cur, copy_out, q.copy_in(target, plan.columns, spec.copy_format), gate=watch
                    )
                    inserted, updated = staged, 0
                except psycopg2.errors.UniqueViolation:
                    # a row with one of the keys is there after all: newer-wins through the staging path
                    cur.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(firstload.SAVEPOINT))
                    src_conn.rollback()
                    log.info("chunk %s: a key of the range is in the target already; upserting", chunk.chunk_id)
                    direct = False
            if not direct:
                stage_shape = (str(target), tuple(plan.columns), tuple(plan.stage_types))
                if prepared is None:
                    cur.execute(q.create_staging(_STAGE, target, plan.columns, plan.stage_types))
                elif prepared.get("__stage") != stage_shape:
                    # a batch keeps one staging table per session, emptied at each commit: a CREATE and DROP
                    # of a temp table per chunk cost about a third of a small chunk's time
                    if "__stage" in prepared:
                        cur.execute(q.drop_table(TableName(name=_STAGE)))
                    cur.execute(q.create_staging(_STAGE, target, plan.columns, plan.stage_types, keep=True))
                    prepared["__stage"] = stage_shape
                extracted, staged = stream_copy(
                    src_conn,
                    cur,
                    copy_out,
                    q.copy_in(_STAGE, plan.columns, spec.copy_format),
                    gate=watch,
                )
                castcheck.check_rounding(cur, plan, _STAGE, spec.key_columns, f"chunk {chunk.chunk_id}")
                inserted, updated = castcheck.upsert_naming_bad_values(
                    cur,
                    plan,
                    _STAGE,
                    spec.key_columns,
                    chunk.chunk_id,
                    lambda: upsert_counted(
                        cur,
                        target,
                        _STAGE,
                        plan.columns,
                        spec.key_columns,
                        spec.version_column,
                        spec.conflict_policy,
                        plan,
                    ),
                )
            seconds = time.monotonic() - t0
            if watch is not None and (watch.checks or watch.pauses or watch.errors):
                log.info("chunk %s: %s", chunk.chunk_id, watch.describe())
            paused_s = watch.paused_s if watch is not None else 0.0
            if paused_s > 0:  # a pause of the read is a wait for the load too: the ledger's figure counts it
                waited_load_s = (waited_load_s or 0.0) + paused_s
            stats = {
                "extracted": staged,
                "inserted": inserted,
                "updated": updated,
                "unchanged": staged - inserted - updated,
                "seconds": seconds,
            }
            ledger.record(
                cur,
                ledger_table,
                backfill=backfill,
                chunk_id=chunk.chunk_id,
                start=chunk.start,
                end=chunk.end,
                stats=stats,
                dag_id=dag_id,
                run_id=run_id,
                key_column=chunk.key_column,
                key_lo=chunk.key_lo,
                key_hi=chunk.key_hi,
                waited_load_s=waited_load_s,
                waited_pacing_s=waited_pacing_s,
            )
            totals = ledger.run_totals(cur, ledger_table, backfill.target, run_id, dag_id=dag_id) if run_id else None
        dst_conn.commit()
        try:
            src_conn.rollback()  # read-only transaction: nothing to keep
        except psycopg2.Error:  # the chunk is committed; a source gone now changes nothing
            pass
        ok = True
        return ChunkResult(
            chunk_id=chunk.chunk_id,
            start=chunk.start.isoformat(),
            end=chunk.end.isoformat(),
            rows_extracted=staged,
            inserted=inserted,
            updated=updated,
            unchanged=staged - inserted - updated,
            seconds=time.monotonic() - t0,
            decisions=plan.decisions,
            run_totals=totals,
            read_pauses=watch.pauses if watch is not None else 0,
            paused_s=round(paused_s, 3),
        )
    except BaseException as err:
        rollback_quietly(dst_conn)
        if prepared is not None:
            prepared.clear()  # the sessions are closed below: their staging table and checks go with them
        if is_interrupt(err):  # execution_timeout, SIGTERM, SIGINT: rolled back; Airflow retries it as it is
            raise
        if plan is not None and getattr(err, "pgcode", None) in encoding.ENCODING_ERRORS:
            raise PermanentChunkError(
                _explain_encoding_error(err, spec, chunk, source, dst_conn, appname, src_table, plan)
            ) from err
        code = str(getattr(err, "pgcode", "") or "")
        if plan is not None and (code.startswith("22") or code == "0A000"):  # 0A000: e.g. NaN -> integer
            found = _explain_cast_failure(spec, chunk, source, appname, src_table, plan)
            if found is not None:
                raise PermanentChunkError(found.describe(chunk.chunk_id, spec.key_columns)) from err
        raise classify(
            err,
            chunk_id=chunk.chunk_id,
            source_conn=src_conn,
            statement_timeout_s=spec.statement_timeout_s,
            conns=(dst_conn,),
        ) from err
    finally:
        if close or not ok:
            close_all(src_conn, dst_conn)
