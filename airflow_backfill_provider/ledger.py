"""The ledger: one row per finished chunk, written in the chunk's own destination transaction.

So a ledger row exists if and only if the chunk's rows were committed. The plan skips chunks already
in the ledger unless ``reprocess`` is asked for. Airflow's task state is the run-level ledger; this
table is the data-level one, and it survives cleared runs and new DAG runs.
"""

from __future__ import annotations

import datetime as dt

from psycopg2 import sql

from airflow_backfill_provider import ddl
from airflow_backfill_provider.spec import TableName

_COLUMNS = sql.SQL(
    """target_table   text        NOT NULL,
    range_start    timestamptz NOT NULL,
    range_end      timestamptz NOT NULL,
    chunk_id       text        NOT NULL,
    rows_extracted bigint      NOT NULL,
    rows_inserted  bigint      NOT NULL,
    rows_updated   bigint      NOT NULL,
    rows_unchanged bigint      NOT NULL,
    seconds        double precision NOT NULL,
    dag_id         text,
    run_id         text,
    finished_at    timestamptz NOT NULL DEFAULT now(),
    key_column     text,
    key_lo         bigint      NOT NULL DEFAULT -9223372036854775808,
    key_hi         bigint      NOT NULL DEFAULT 9223372036854775807,
    PRIMARY KEY (target_table, range_start, range_end, key_lo, key_hi)"""
)

#: a chunk's key range [key_lo, key_hi) in the ledger; time chunks (and open ends) use these sentinels
KEY_MIN, KEY_MAX = -(2**63), 2**63 - 1


def ensure_table(conn, ledger: TableName) -> None:
    """Create the ledger if missing (see ``ddl.ensure_table``: one lookup when it exists); a ledger from
    before key ranges gets the key_lo/key_hi columns (defaults: every key) and the wider primary key."""
    ddl.ensure_table(conn, ledger, _COLUMNS)
    if not _has_key_columns(conn, ledger):
        _add_key_columns(conn, ledger)


def _has_key_columns(conn, ledger: TableName) -> bool:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'key_hi'"
            " AND NOT attisdropped)",
            (sql.Identifier(*ledger.parts).as_string(cur),),
        )
        return bool(cur.fetchone()[0])


def _add_key_columns(conn, ledger: TableName) -> None:
    t = sql.Identifier(*ledger.parts)
    ddl.run_locked(
        conn,
        ledger,
        sql.SQL(
            """DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = {reg}::regclass AND attname = 'key_hi') THEN
                 ALTER TABLE {t} ADD COLUMN key_column text,
                   ADD COLUMN key_lo bigint NOT NULL DEFAULT -9223372036854775808,
                   ADD COLUMN key_hi bigint NOT NULL DEFAULT 9223372036854775807;
                 EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', {reg}::regclass,
                   (SELECT conname FROM pg_constraint WHERE conrelid = {reg}::regclass AND contype = 'p'));
                 ALTER TABLE {t} ADD PRIMARY KEY (target_table, range_start, range_end, key_lo, key_hi);
               END IF; END $$"""
        ).format(t=t, reg=sql.Literal(t.as_string(conn))),
    )


def record(
    cur, ledger: TableName, *, target: str, chunk_id: str, start, end, stats: dict, dag_id, run_id,
    key_column: str | None = None, key_lo: int | None = None, key_hi: int | None = None,
) -> None:
    """Insert or refresh this chunk's row; call inside the chunk's transaction, before commit."""
    keys = {
        "key_column": key_column,
        "key_lo": KEY_MIN if key_lo is None else key_lo,
        "key_hi": KEY_MAX if key_hi is None else key_hi,
    }
    cur.execute(
        sql.SQL(
            """INSERT INTO {t} AS l (target_table, range_start, range_end, chunk_id, rows_extracted,
                   rows_inserted, rows_updated, rows_unchanged, seconds, dag_id, run_id, key_column, key_lo, key_hi)
               VALUES (%(target)s, %(start)s, %(end)s, %(chunk_id)s, %(extracted)s, %(inserted)s,
                   %(updated)s, %(unchanged)s, %(seconds)s, %(dag_id)s, %(run_id)s, %(key_column)s, %(key_lo)s,
                   %(key_hi)s)
               ON CONFLICT (target_table, range_start, range_end, key_lo, key_hi) DO UPDATE SET
                   chunk_id = EXCLUDED.chunk_id, rows_extracted = EXCLUDED.rows_extracted,
                   rows_inserted = EXCLUDED.rows_inserted, rows_updated = EXCLUDED.rows_updated,
                   rows_unchanged = EXCLUDED.rows_unchanged, seconds = EXCLUDED.seconds,
                   dag_id = EXCLUDED.dag_id, run_id = EXCLUDED.run_id, finished_at = now()"""
        ).format(t=sql.Identifier(*ledger.parts)),
        {"target": target, "start": start, "end": end, "chunk_id": chunk_id, "dag_id": dag_id, "run_id": run_id,
         **keys, **stats},
    )


def done_ranges(conn, ledger: TableName, target: str) -> set[tuple[dt.datetime, dt.datetime]]:
    """Ranges already loaded for ``target``; an absent ledger table means nothing is done yet."""
    with conn.cursor() as cur:
        if not ddl.exists(cur, ledger):
            return set()
        cur.execute(
            sql.SQL("SELECT range_start, range_end FROM {t} WHERE target_table = %s").format(
                t=sql.Identifier(*ledger.parts)
            ),
            (target,),
        )
        return {(a, b) for a, b in cur.fetchall()}


def done_rects(conn, ledger: TableName, target: str, key_column: str | None = None, run_id: str | None = None):
    """The ledger's rows for ``target`` as coverage rectangles (coverage.py); read-only (a dry run writes
    nothing, so a ledger from before key ranges is read as it is: every row covers all keys). Rows cut on
    another key column than ``key_column`` cover nothing here (their ranges mean other rows)."""
    from airflow_backfill_provider.coverage import rect

    with conn.cursor() as cur:
        if not ddl.exists(cur, ledger):
            return []
    t = sql.Identifier(*ledger.parts)
    with conn.cursor() as cur:
        if _has_key_columns(conn, ledger):
            q = sql.SQL("SELECT range_start, range_end, key_column, key_lo, key_hi FROM {t} WHERE target_table = %s")
        else:
            q = sql.SQL("SELECT range_start, range_end, NULL, NULL, NULL FROM {t} WHERE target_table = %s")
        q = q.format(t=t)
        if run_id is not None:  # a reprocess batch resuming: skip only what this run already loaded
            q = q + sql.SQL(" AND run_id = %s")
        cur.execute(q, (target,) if run_id is None else (target, run_id))
        out = []
        for a, b, col, lo, hi in cur.fetchall():
            lo = None if lo is None or lo == KEY_MIN else lo
            hi = None if hi is None or hi == KEY_MAX else hi
            if (lo is not None or hi is not None) and col != key_column:
                continue
            out.append(rect(a, b, lo, hi))
        return out


def measured_rate(conn, ledger: TableName, target: str, *, last: int = 50) -> tuple[float, int] | None:
    """(rows/s, chunks) over the last ``last`` non-trivial chunks of ``target``: what auto sizing learns from."""
    with conn.cursor() as cur:
        if not ddl.exists(cur, ledger):
            return None
        cur.execute(
            sql.SQL(
                "SELECT sum(rows_extracted), sum(seconds), count(*) FROM (SELECT rows_extracted, seconds FROM {t}"
                " WHERE target_table = %s AND rows_extracted > 0 AND seconds > 0"
                " ORDER BY finished_at DESC LIMIT %s) AS recent"
            ).format(t=sql.Identifier(*ledger.parts)),
            (target, last),
        )
        rows, seconds, n = cur.fetchone()
    if not n or not seconds:
        return None
    return float(rows) / float(seconds), int(n)


def forget(conn, ledger: TableName, target: str) -> None:
    """Used by swap mode after the final merge: the parallel table is gone, so are its chunk rows."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("DELETE FROM {t} WHERE target_table = %s").format(t=sql.Identifier(*ledger.parts)), (target,)
        )
