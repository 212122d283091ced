"""The ledger: one row per finished chunk of one backfill, written in the chunk's own destination transaction.

So a ledger row exists if and only if the chunk's rows were committed. The plan skips chunks already
in the ledger unless ``reprocess`` is asked for. Airflow's task state is the run-level ledger; this
table is the data-level one, and it survives cleared runs and new DAG runs.

A row is keyed by (resolved target relation, backfill key, range): the backfill key fingerprints the
source database and relations and what selects rows (``identity.py``), so a second backfill into the
same table (another source, another time column or historical split) loads every range itself.

Ledgers of the previous release (keyed by the target as spelled and the range only) are migrated in
place on first use: their rows get ``backfill_key = ''`` and count as done for NO backfill, so the
first run after the upgrade loads its ranges again (safe: an unchanged row is not rewritten).
"""

from __future__ import annotations

import datetime as dt
import json

from psycopg2 import sql

from airflow_backfill_provider import ddl
from airflow_backfill_provider.identity import BackfillIdentity
from airflow_backfill_provider.spec import TableName

_COLUMNS = sql.SQL(
    """target_table   text        NOT NULL,
    backfill_key   text        NOT NULL DEFAULT '',
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
    backfill       jsonb,
    PRIMARY KEY (target_table, backfill_key, range_start, range_end)"""
)

# one lookup per chunk: does the ledger exist, and is it of this release (has backfill_key)?
_STATE = """
SELECT r IS NOT NULL, EXISTS (SELECT 1 FROM pg_attribute
                               WHERE attrelid = r AND attname = 'backfill_key' AND NOT attisdropped)
FROM (SELECT to_regclass(%s) AS r) AS t
"""


def ensure_table(conn, ledger: TableName) -> None:
    """Create the ledger if missing, or migrate a previous release's ledger (both under the DDL lock)."""
    with conn.cursor() as cur:
        cur.execute(_STATE, (sql.Identifier(*ledger.parts).as_string(cur),))
        present, current = cur.fetchone()
    if present and current:
        return
    if not present:
        ddl.ensure_table(conn, ledger, _COLUMNS)
        # a worker of the previous release may have created it meanwhile (rolling upgrade): then migrate
        with conn.cursor() as cur:
            cur.execute(_STATE, (sql.Identifier(*ledger.parts).as_string(cur),))
            if cur.fetchone()[1]:
                return
    ddl.run_locked(conn, ledger, lambda cur: _migrate(cur, ledger))


def _migrate(cur, ledger: TableName) -> None:
    """Previous release -> this one: add the key columns, re-key the primary key. Idempotent."""
    t = sql.Identifier(*ledger.parts)
    cur.execute(sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS backfill_key text NOT NULL DEFAULT ''").format(t=t))
    cur.execute(sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS backfill jsonb").format(t=t))
    cur.execute(
        """SELECT c.conname, 'backfill_key' = ANY (SELECT a.attname FROM pg_attribute a
                                                 WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey))
             FROM pg_constraint c WHERE c.conrelid = to_regclass(%s) AND c.contype = 'p'""",
        (t.as_string(cur),),
    )
    row = cur.fetchone()
    if row is not None and row[1]:
        return
    if row is not None:
        cur.execute(sql.SQL("ALTER TABLE {t} DROP CONSTRAINT {c}").format(t=t, c=sql.Identifier(row[0])))
    cur.execute(
        sql.SQL("ALTER TABLE {t} ADD PRIMARY KEY (target_table, backfill_key, range_start, range_end)").format(t=t)
    )


def record(cur, ledger: TableName, *, backfill: BackfillIdentity, chunk_id: str, start, end, stats: dict, dag_id, run_id) -> None:
    """Insert or refresh this chunk's row; call inside the chunk's transaction, before commit."""
    cur.execute(
        sql.SQL(
            """INSERT INTO {t} AS l (target_table, backfill_key, range_start, range_end, chunk_id, rows_extracted,
                   rows_inserted, rows_updated, rows_unchanged, seconds, dag_id, run_id, backfill)
               VALUES (%(target)s, %(key)s, %(start)s, %(end)s, %(chunk_id)s, %(extracted)s, %(inserted)s,
                   %(updated)s, %(unchanged)s, %(seconds)s, %(dag_id)s, %(run_id)s, %(backfill)s)
               ON CONFLICT (target_table, backfill_key, range_start, range_end) DO UPDATE SET
                   chunk_id = EXCLUDED.chunk_id, rows_extracted = EXCLUDED.rows_extracted,
                   rows_inserted = EXCLUDED.rows_inserted, rows_updated = EXCLUDED.rows_updated,
                   rows_unchanged = EXCLUDED.rows_unchanged, seconds = EXCLUDED.seconds,
                   dag_id = EXCLUDED.dag_id, run_id = EXCLUDED.run_id, finished_at = now(),
                   backfill = EXCLUDED.backfill"""
        ).format(t=sql.Identifier(*ledger.parts)),
        {
            "target": backfill.target, "key": backfill.key, "backfill": json.dumps(backfill.description),
            "start": start, "end": end, "chunk_id": chunk_id, "dag_id": dag_id, "run_id": run_id, **stats,
        },
    )


def is_current(conn, ledger: TableName) -> bool:
    """The ledger exists in this release's shape; if not, no range counts as done for any backfill."""
    with conn.cursor() as cur:
        cur.execute(_STATE, (sql.Identifier(*ledger.parts).as_string(cur),))
        present, current = cur.fetchone()
    return bool(present and current)


def done_ranges(conn, ledger: TableName, backfill: BackfillIdentity) -> set[tuple[dt.datetime, dt.datetime]]:
    """Ranges this backfill already loaded; an absent (or legacy-only) ledger means nothing is done yet."""
    if not is_current(conn, ledger):
        return set()
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT range_start, range_end FROM {t} WHERE target_table = %s AND backfill_key = %s").format(
                t=sql.Identifier(*ledger.parts)
            ),
            (backfill.target, backfill.key),
        )
        return {(a, b) for a, b in cur.fetchall()}


def forget(conn, ledger: TableName, target: str) -> None:
    """Used by swap mode after the final merge: the parallel table is gone, so are its chunk rows (every backfill's)."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("DELETE FROM {t} WHERE target_table = %s").format(t=sql.Identifier(*ledger.parts)), (target,)
        )


def has_rows_for(cur, ledger: TableName, target: str) -> bool:
    """Any ledger row (of any backfill or release) for ``target``: evidence the provider wrote that table."""
    if not ddl.exists(cur, ledger):
        return False
    cur.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {t} WHERE target_table = %s)").format(t=sql.Identifier(*ledger.parts)),
        (target,),
    )
    return cur.fetchone()[0]
