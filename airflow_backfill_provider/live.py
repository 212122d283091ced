"""Live ingest: incremental loads of recent changes, and the ONLY writer of the watermark.

One run, in ONE destination transaction:

    lock the target's watermark row  ->  COPY source rows with cursor > watermark - lookback into a stage
    ->  newer-wins upsert into the live table  ->  watermark = max(old, highest cursor staged)  ->  COMMIT

So the watermark moves only together with the rows it covers, and never backwards. The backfill reads
the watermark (``prepare/watermark.py``) to clip its range and never writes it: no backfill module imports this
one (``tests/prepare/test_watermark_rule.py`` checks that).

Why a lookback: a source transaction can stamp ``updated_at`` and commit after a later-stamped one
was already copied; re-reading ``lookback_s`` below the watermark catches it, and the newer-wins upsert
makes the re-read free (an unchanged row is not rewritten).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass

from psycopg2 import sql

from airflow_backfill_provider.core import ddl, timebounds
from airflow_backfill_provider.prepare import catalog as schema, drift, identity
from airflow_backfill_provider.transfer import castcheck
from airflow_backfill_provider.core import sql as q
from airflow_backfill_provider.core.chunks import to_datetime
from airflow_backfill_provider.connections import close_all, open_destination, open_source, rollback_quietly
from airflow_backfill_provider.core.errors import classify
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.core.interrupts import is_interrupt
from airflow_backfill_provider.core.spec import BackfillSpec, TableName
from airflow_backfill_provider.transfer.upsert import upsert_counted
from airflow_backfill_provider.transfer.pipe import stream_copy
from airflow_backfill_provider.prepare.watermark import WATERMARK_COLUMNS, target_key

log = logging.getLogger(__name__)

_STAGE = "live_stage"


@dataclass
class LiveResult:
    target: str
    previous_watermark: str | None
    watermark: str
    lower_bound: str
    rows_extracted: int
    inserted: int
    updated: int
    unchanged: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def ensure_watermark_table(conn, table: TableName) -> None:
    """Create the watermark table if missing (WATERMARK_COLUMNS is a constant of this package)."""
    ddl.ensure_table(conn, table, sql.SQL(WATERMARK_COLUMNS))
    with conn.cursor() as cur:  # a previous release's table has no ``source`` column: add it (DDL lock)
        cur.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'source'"
            " AND NOT attisdropped)",
            (q.ident(table).as_string(cur),),
        )
        current = cur.fetchone()[0]
    if not current:
        ddl.run_locked(
            conn, table, sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS source text").format(t=q.ident(table))
        )


def claim_watermark(cur, table: TableName, target: str, source: str) -> None:
    """Refuse a second live ingest from another source into ``target``; record the source on first use.

    One watermark per target: live ingest from ``orders_us`` moving it would make live ingest from
    ``orders_eu`` skip every eu row stamped below it. Call after :func:`lock_watermark` (row locked).
    """
    cur.execute(sql.SQL("SELECT source FROM {t} WHERE target_table = %s").format(t=q.ident(table)), (target,))
    row = cur.fetchone()
    if row is None:
        return  # first run: advance_watermark records it
    if row[0] is None:  # a row of the previous release, or written without a source
        cur.execute(
            sql.SQL("UPDATE {t} SET source = %s WHERE target_table = %s").format(t=q.ident(table)), (source, target)
        )
    elif row[0] != source:
        raise PermanentChunkError(
            f"the watermark of {target!r} in {str(table)!r} belongs to live ingest from {row[0]!r}, and this spec reads "
            f"{source!r}: two live ingests sharing one watermark skip each other's rows. Give each source its own "
            "watermark table (watermark.table in this spec, used by its backfill too), or load both through one source"
        )


def lock_watermark(cur, table: TableName, target: str, legacy: str | None = None) -> dt.datetime | None:
    """Serialize live runs of one target and read its watermark (row locked until commit).

    ``target`` is the resolved relation (``watermark.target_key``); ``legacy`` the spec's spelling, under
    which the previous release kept the row: such a row is re-keyed here, in the run's transaction.
    """
    # the advisory lock also covers the first run, when there is no row to lock yet
    cur.execute(q.advisory_xact_lock(), (f"live|{target}",))
    if legacy is not None and legacy != target:
        cur.execute(
            sql.SQL(
                "UPDATE {t} SET target_table = %s WHERE target_table = %s"
                " AND NOT EXISTS (SELECT 1 FROM {t} WHERE target_table = %s)"
            ).format(t=q.ident(table)),
            (target, legacy, target),
        )
    cur.execute(
        sql.SQL("SELECT watermark FROM {t} WHERE target_table = %s FOR UPDATE").format(t=q.ident(table)), (target,)
    )
    row = cur.fetchone()
    return row[0] if row else None


def advance_watermark(cur, table: TableName, target: str, value: dt.datetime, source: str | None = None) -> dt.datetime:
    """THE watermark writer. Moves forward only; a value at or below the stored one changes nothing.

    Call it inside the live run's transaction, after the upsert, so rows and watermark commit together.
    Returns the watermark in force afterwards.
    """
    cur.execute(
        sql.SQL(
            "INSERT INTO {t} AS w (target_table, watermark, source) VALUES (%s, %s, %s)"
            " ON CONFLICT (target_table) DO UPDATE SET watermark = EXCLUDED.watermark, updated_at = now()"
            " WHERE EXCLUDED.watermark > w.watermark"
            " RETURNING watermark"
        ).format(t=q.ident(table)),
        (target, value, source),
    )
    row = cur.fetchone()
    if row is not None:
        return row[0]
    cur.execute(sql.SQL("SELECT watermark FROM {t} WHERE target_table = %s").format(t=q.ident(table)), (target,))
    return cur.fetchone()[0]


def _columns(spec: BackfillSpec, src_conn, dst_conn) -> tuple[drift.ColumnPlan, str, str, str]:
    """Same destination-is-truth column plan as a backfill chunk, against the live table and current source;
    the cursor's kind (date / timestamp / timestamptz) on the source and in the destination; and the
    kind of the time column on the source, for the time arm's bound."""
    live = spec.destination
    dest_cols, dest_keys = schema.describe_table(dst_conn, live, side="destination")
    schema.check_destination(spec, dest_cols, dest_keys, live)
    src_cols = schema.table_columns(src_conn, spec.source, side="source")
    cursor = spec.live_cursor_column
    if cursor not in {c.name for c in src_cols}:
        raise PermanentChunkError(
            f"source table {spec.source_table!r} has no column {cursor!r}, which live ingest reads incrementally; "
            "set live.cursor_column to a timestamp column that every insert and update advances"
        )
    if cursor not in {c.name for c in dest_cols}:
        raise PermanentChunkError(
            f"destination table {str(live)!r} has no column {cursor!r} (live.cursor_column); the watermark is "
            "computed from the loaded rows, so the cursor column must be loaded too"
        )
    kinds = []
    for conn, cols, table in ((src_conn, src_cols, spec.source), (dst_conn, dest_cols, live)):
        kind = timebounds.kind_of_type(next(c.type_sql for c in cols if c.name == cursor))
        kinds.append(
            kind
            or timebounds.probe_kind(
                conn, q.ident(table), sql.Identifier(cursor), what=f"live.cursor_column {cursor!r} of {table}"
            )
        )
    plan = drift.plan_columns(
        spec,
        dest_cols,
        src_cols,
        dest_types=schema.describe_types(dst_conn, live),
        src_types=schema.describe_types(src_conn, spec.source),
    )
    # the time column's kind on the source, for the time arm of live ingest's select (see run_live_ingest)
    time_type = next((c.type_sql for c in src_cols if c.name == spec.time_column), None)
    time_kind = timebounds.kind_of_type(time_type) or timebounds.probe_kind(
        src_conn, q.ident(spec.source), sql.Identifier(spec.time_column), what=f"time_column of {spec.source}"
    )
    return plan, kinds[0], kinds[1], time_kind


def _first_watermark(spec: BackfillSpec, src_conn) -> dt.datetime:
    """No stored watermark yet: live ingest starts at ``live.start_from``, else at the source's clock."""
    if spec.live.start_from is not None:
        return to_datetime(spec.live.start_from, spec.timezone, what="live.start_from")
    with src_conn.cursor() as cur:
        cur.execute("SELECT now()")  # the source's clock: cursor values come from the source too
        return cur.fetchone()[0]


def run_live_ingest(
    spec: BackfillSpec,
    *,
    source: str | None = None,
    destination: str | None = None,
    dag_id: str | None = None,
) -> LiveResult:
    """One incremental run for ``spec``'s table. Safe to run at any time, also during a backfill.

    ``source``/``destination`` default to the spec's Airflow connection ids; DSN URLs work too.
    Raises TransientChunkError (retry) or PermanentChunkError (fix the spec/tables first).
    """
    dag_id = dag_id or spec.live_dag_id
    target = str(spec.destination)  # as spelled until resolved on the destination (error messages)
    wm_table = TableName.parse(spec.watermark.table)
    appname = f"live:{dag_id}"
    t0 = time.monotonic()
    src_conn = dst_conn = None
    try:
        src_conn = open_source(spec, appname, source)
        dst_conn = open_destination(spec, appname, destination)
        # catalog checks first: a refused spec writes nothing
        plan, src_kind, dst_kind, time_kind = _columns(spec, src_conn, dst_conn)
        ensure_watermark_table(dst_conn, wm_table)
        target = target_key(dst_conn, spec.destination)
        cursor_col = spec.live_cursor_column
        lookback = dt.timedelta(seconds=spec.live.lookback_s)
        with dst_conn.cursor() as cur:
            previous = lock_watermark(cur, wm_table, target, legacy=str(spec.destination))
            source_key = (
                f"{identity.source_database(src_conn, source or spec.source_conn_id)}"
                f"|{identity.resolve(src_conn, spec.source, side='source')}"
            )
            claim_watermark(cur, wm_table, target, source_key)
            base = previous if previous is not None else _first_watermark(spec, src_conn)
            lower = base - lookback
            cur.execute(q.create_staging(_STAGE, spec.destination, plan.columns, plan.stage_types))
            # rows at or after the backfill's clip belong to live ingest whatever their cursor says: a NULL
            # cursor (never updated) or one older than the time column is read through the time column.
            # Bounds are literals of each column's own type (a naive one is wall time in the spec's timezone)
            time_col = spec.time_column if spec.time_column != cursor_col else None
            select = q.incremental_select(
                spec.source,
                plan.copy_exprs,
                cursor_col,
                timebounds.after(src_kind, lower, spec.timezone),
                time_column=time_col,
                time_lower=timebounds.at_or_before(time_kind, lower, spec.timezone),
            )
            _, staged = stream_copy(
                src_conn, cur, q.copy_out(select, spec.copy_format), q.copy_in(_STAGE, plan.columns, spec.copy_format)
            )
            castcheck.check_rounding(cur, plan, _STAGE, spec.key_columns, f"live run of {target}")
            # with a version column: newer wins, as in the backfill. Without one, live rows are the latest
            # by definition, so live ingest overwrites when different (the backfill's policy decides its side).
            policy = "backfill_wins" if spec.version_column is None else spec.conflict_policy
            inserted, updated = castcheck.upsert_naming_bad_values(
                cur,
                plan,
                _STAGE,
                spec.key_columns,
                f"live {target}",
                lambda: upsert_counted(
                    cur, spec.destination, _STAGE, plan.columns, spec.key_columns, spec.version_column, policy, plan
                ),
            )
            cur.execute(q.max_of(_STAGE, cursor_col, dst_kind, spec.timezone))
            seen = cur.fetchone()[0]
            new = max(base, seen) if seen is not None else base
            current = advance_watermark(cur, wm_table, target, new, source_key)
        dst_conn.commit()
        src_conn.rollback()  # read-only: nothing to keep
        result = LiveResult(
            target=target,
            previous_watermark=previous.isoformat() if previous else None,
            watermark=current.isoformat(),
            lower_bound=lower.isoformat(),
            rows_extracted=staged,
            inserted=inserted,
            updated=updated,
            unchanged=staged - inserted - updated,
            seconds=time.monotonic() - t0,
        )
        log.debug("live run %s", result)
        return result
    except BaseException as err:
        rollback_quietly(dst_conn)
        if is_interrupt(err):  # execution_timeout, SIGTERM: rolled back; Airflow retries it as it is
            raise
        raise classify(err, chunk_id=f"live {target}", source_conn=src_conn, conns=(dst_conn,)) from err
    finally:
        close_all(src_conn, dst_conn)
