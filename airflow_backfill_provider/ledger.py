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
    PRIMARY KEY (target_table, range_start, range_end)"""
)


def ensure_table(conn, ledger: TableName) -> None:
    """Create the ledger if missing (see ``ddl.ensure_table``: one lookup when it exists)."""
    ddl.ensure_table(conn, ledger, _COLUMNS)


def record(cur, ledger: TableName, *, target: str, chunk_id: str, start, end, stats: dict, dag_id, run_id) -> None:
    """Insert or refresh this chunk's row; call inside the chunk's transaction, before commit."""
    cur.execute(
        sql.SQL(
            """INSERT INTO {t} AS l (target_table, range_start, range_end, chunk_id, rows_extracted,
                   rows_inserted, rows_updated, rows_unchanged, seconds, dag_id, run_id)
               VALUES (%(target)s, %(start)s, %(end)s, %(chunk_id)s, %(extracted)s, %(inserted)s,
                   %(updated)s, %(unchanged)s, %(seconds)s, %(dag_id)s, %(run_id)s)
               ON CONFLICT (target_table, range_start, range_end) DO UPDATE SET
                   chunk_id = EXCLUDED.chunk_id, rows_extracted = EXCLUDED.rows_extracted,
                   rows_inserted = EXCLUDED.rows_inserted, rows_updated = EXCLUDED.rows_updated,
                   rows_unchanged = EXCLUDED.rows_unchanged, seconds = EXCLUDED.seconds,
                   dag_id = EXCLUDED.dag_id, run_id = EXCLUDED.run_id, finished_at = now()"""
        ).format(t=sql.Identifier(*ledger.parts)),
        {"target": target, "start": start, "end": end, "chunk_id": chunk_id, "dag_id": dag_id, "run_id": run_id, **stats},
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


def forget(conn, ledger: TableName, target: str) -> None:
    """Used by swap mode after the final merge: the parallel table is gone, so are its chunk rows."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("DELETE FROM {t} WHERE target_table = %s").format(t=sql.Identifier(*ledger.parts)), (target,)
        )
