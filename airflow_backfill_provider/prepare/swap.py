"""Pattern B (``mode: swap``): chunks load into ``<table>_backfill``; one final merge moves them into the live table.

    chunks  ->  <table>_backfill (idempotent per chunk, same newer-wins upsert and ledger as Pattern A)
    merge   ->  INSERT INTO <table> SELECT ... FROM <table>_backfill ON CONFLICT (keys) DO NOTHING
                DROP TABLE <table>_backfill; forget its ledger rows; COMMIT  (one transaction)

The live table sees no backfill writes until the merge, and the merge never touches a row live ingest
already wrote (DO NOTHING): live rows always win, with or without a version column. A failed merge
rolls back completely (the parallel table and its ledger rows are still there) and can be rerun.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from psycopg2 import sql

from airflow_backfill_provider.core import ddl
from airflow_backfill_provider.ledger import table as ledger
from airflow_backfill_provider.prepare import catalog as schema, identity
from airflow_backfill_provider.core import sql as q
from airflow_backfill_provider.connections import close_all, connect, rollback_quietly
from airflow_backfill_provider.core.errors import classify
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.core.interrupts import is_interrupt
from airflow_backfill_provider.core.spec import BackfillSpec, TableName

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    target: str
    parallel_table: str
    merged: bool  # False: there was no parallel table (already merged, or nothing was loaded)
    rows_in_parallel: int
    inserted: int
    kept_live: int  # keys live ingest already had: left as they are
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def as_live(spec: BackfillSpec) -> BackfillSpec:
    """The spec with the live table as the chunks' target: pre-flight checks before the parallel table exists."""
    return spec.model_copy(update={"mode": "upsert"}) if spec.mode == "swap" else spec


#: the start of the COMMENT the provider puts on every parallel table it creates; the rest names the live table
MARKER = "airflow_backfill_provider: parallel table of "


def _marker(spec: BackfillSpec, live: str) -> str:
    return (
        f"{MARKER}{live} (mode: swap, DAG {spec.effective_dag_id}); the merge moves its rows into {live} and drops it"
    )


def ownership(cur, spec: BackfillSpec) -> str:
    """Whose is ``<table>_backfill``: 'missing', 'ours' (our marker), 'legacy' (unmarked, but the ledger has
    rows for it: a parallel table of the previous release, which did not mark) or 'foreign'."""
    parallel = spec.staging_target
    cur.execute(
        "SELECT r IS NOT NULL, obj_description(r, 'pg_class') FROM (SELECT to_regclass(%s) AS r) t",
        (q.ident(parallel).as_string(cur),),
    )
    present, comment = cur.fetchone()
    if not present:
        return "missing"
    if comment and comment.startswith(MARKER):
        return "ours"
    ledger_table = TableName.parse(spec.ledger_table)
    spellings = {str(parallel), identity.resolve(cur.connection, parallel, side="destination")}
    if any(ledger.has_rows_for(cur, ledger_table, name) for name in spellings):
        return "legacy"
    return "foreign"


def _refuse_foreign(spec: BackfillSpec) -> PermanentChunkError:
    par, live = spec.staging_target, spec.destination
    return PermanentChunkError(
        f"table {str(par)!r} exists but was not created by this provider (no marker comment, no ledger rows): "
        f"mode: swap would load into it, merge ALL its rows into {str(live)!r} and DROP it. Nothing was written. "
        f"Rename or move that table, or use another destination; if it really is a leftover parallel table "
        f"of this backfill, mark it: COMMENT ON TABLE {par} IS '{MARKER}...'"
    )


def ensure_parallel_table(conn, spec: BackfillSpec) -> None:
    """Create ``<table>_backfill`` LIKE the live table if missing, and mark it as ours (DDL lock, own transaction).

    Called by the plan (before its pre-flight) and by every chunk, so a chunk run on its own works too.
    Refuses (PermanentChunkError, before any write) a ``<table>_backfill`` the provider did not create.
    """
    if spec.mode != "swap":
        return
    schema.table_oid(conn, spec.destination, side="destination")  # clear error if the live table is missing
    with conn.cursor() as cur:
        state = ownership(cur, spec)
    conn.rollback()  # end the catalog reads' transaction: the DDL below runs in its own
    if state == "ours":
        return
    if state == "foreign":
        raise _refuse_foreign(spec)
    ddl.run_locked(conn, spec.staging_target, lambda cur: _create_marked(cur, spec))


def _create_marked(cur, spec: BackfillSpec) -> None:
    """Under the DDL lock: create and mark, adopt a legacy one, or refuse one that appeared meanwhile."""
    par, live = spec.staging_target, spec.destination
    state = ownership(cur, spec)
    if state == "ours":
        return
    if state == "foreign":
        raise _refuse_foreign(spec)
    if state == "missing":
        cur.execute(q.create_like(par, live))
    else:
        log.warning("adopting %s: an unmarked parallel table with ledger rows (created by a previous release)", par)
    live_name = identity.resolve(cur.connection, live, side="destination")
    cur.execute(sql.SQL("COMMENT ON TABLE {t} IS {c}").format(t=q.ident(par), c=sql.Literal(_marker(spec, live_name))))


def merge_parallel_table(
    spec: BackfillSpec, *, destination: str | None = None, dag_id: str | None = None
) -> MergeResult:
    """The final merge of Pattern B, in one destination transaction. Rerunnable.

    Raises TransientChunkError (retry) or PermanentChunkError; on any error nothing is applied.
    """
    if spec.mode != "swap":
        raise PermanentChunkError(f"merge is only for mode: swap; spec {spec.name!r} has mode {spec.mode!r}")
    live, parallel = spec.destination, spec.staging_target
    t0 = time.monotonic()
    conn = None
    try:
        conn = connect(
            destination or spec.destination_conn_id,
            application_name=f"backfill:{dag_id or spec.effective_dag_id}:merge",
            timezone=spec.timezone,
            lock_timeout_s=spec.lock_timeout_s,
        )
        with conn.cursor() as cur:
            # one merge at a time per table; chunks still writing the parallel table hold a lock DROP waits for
            cur.execute(q.advisory_xact_lock(), (f"merge|{parallel}",))
            state = ownership(cur, spec)
            if state == "missing":
                conn.rollback()
                return MergeResult(str(live), str(parallel), False, 0, 0, 0, time.monotonic() - t0)
            if state == "foreign":  # never merge or drop a table the provider did not create
                raise _refuse_foreign(spec)
            live_all, live_keys = schema.describe_table(conn, live, side="destination")
            schema.check_destination(spec, live_all, live_keys, live)
            par_cols = {c.name for c in schema.table_columns(conn, parallel, side="destination")}
            columns = [c.name for c in live_all if c.name in par_cols]  # live-only columns (added later) take defaults
            cur.execute(q.count_rows(parallel))
            rows = cur.fetchone()[0]
            cur.execute(q.merge_insert(live, parallel, columns, spec.key_columns))
            inserted = cur.fetchone()[0]
            resolved = identity.resolve(conn, parallel, side="destination")  # before it is gone
            cur.execute(q.drop_table(parallel))
            ledger_table = TableName.parse(spec.ledger_table)
            if ddl.exists(cur, ledger_table):
                # every key the ledger may hold for it: resolved (this release), as spelled (previous release)
                for name in {str(parallel), resolved}:
                    ledger.forget(conn, ledger_table, name)
        conn.commit()
    except BaseException as err:
        rollback_quietly(conn)
        if is_interrupt(err):  # execution_timeout, SIGTERM: rolled back; Airflow retries it as it is
            raise
        raise classify(err, chunk_id=f"merge {parallel}", conns=(conn,)) from err
    finally:
        close_all(conn)
    return MergeResult(str(live), str(parallel), True, rows, inserted, rows - inserted, time.monotonic() - t0)
