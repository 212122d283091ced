"""The ledger: one row per finished chunk of one backfill, written in the chunk's own destination transaction.

So a ledger row exists if and only if the chunk's rows were committed. The plan skips chunks already
in the ledger unless ``reprocess`` is asked for. Airflow's task state is the run-level ledger; this
table is the data-level one, and it survives cleared runs and new DAG runs.

A row is keyed by (resolved target relation, backfill key, range): the backfill key fingerprints the
source database and relations and what selects rows (``prepare/identity.py``), so a second backfill into the
same table (another source, another time column or historical split) loads every range itself.

Ledgers of the previous release (keyed by the target as spelled and the range only) are migrated in
place on first use: their rows get ``backfill_key = ''`` and count as done for NO backfill, so the
first run after the upgrade loads its ranges again (safe: an unchanged row is not rewritten).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from psycopg2 import sql

from airflow_backfill_provider.core import ddl
from airflow_backfill_provider.core.spec import TableName

if TYPE_CHECKING:  # a type only: the ledger sits below the identity's stage (catalog reads), see make lint
    from airflow_backfill_provider.prepare.identity import BackfillIdentity

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
    key_column     text,
    key_lo         bigint      NOT NULL DEFAULT -9223372036854775808,
    key_hi         bigint      NOT NULL DEFAULT 9223372036854775807,
    waited_load_s  double precision,
    waited_pacing_s double precision,
    PRIMARY KEY (target_table, backfill_key, range_start, range_end, key_lo, key_hi)"""
)

#: a chunk's key range [key_lo, key_hi) in the ledger; time chunks (and open ends) use these sentinels
KEY_MIN, KEY_MAX = -(2**63), 2**63 - 1
_PK = ("target_table", "backfill_key", "range_start", "range_end", "key_lo", "key_hi")

# one lookup per chunk: does the ledger exist, is it keyed as this release keys it (backfill_key and key
# ranges: what decides which ranges are done), and has it the per-chunk wait columns (shown by the progress page)?
#: (present, keyed, waits): the ledger exists / has this release's key columns / has the wait columns;
#: ``%(ledger)s`` is its quoted name. prepare/facts.py reads it in the chunk's catalog check too.
STATE_SQL = """
SELECT r IS NOT NULL,
       (SELECT count(*) = 2 FROM pg_attribute
         WHERE attrelid = r AND attname IN ('backfill_key', 'key_hi') AND NOT attisdropped),
       (SELECT count(*) = 2 FROM pg_attribute
         WHERE attrelid = r AND attname IN ('waited_load_s', 'waited_pacing_s') AND NOT attisdropped)
FROM (SELECT to_regclass(%(ledger)s) AS r) AS t
"""


def is_ready(state) -> bool:
    """A :data:`STATE_SQL` row of a ledger this release writes as it is (no DDL needed)."""
    return bool(state and all(state))


def ensure_table(conn, ledger: TableName) -> None:
    """Create the ledger if missing, or migrate a previous release's ledger (both under the DDL lock)."""
    with conn.cursor() as cur:
        cur.execute(STATE_SQL, {"ledger": sql.Identifier(*ledger.parts).as_string(cur)})
        state = cur.fetchone()
    if is_ready(state):
        return
    present = state[0]
    if not present:
        ddl.ensure_table(conn, ledger, _COLUMNS)
        # a worker of the previous release may have created it meanwhile (rolling upgrade): then migrate
        with conn.cursor() as cur:
            cur.execute(STATE_SQL, {"ledger": sql.Identifier(*ledger.parts).as_string(cur)})
            if all(cur.fetchone()[1:]):
                return
    ddl.run_locked(conn, ledger, lambda cur: _migrate(cur, ledger))


def _migrate(cur, ledger: TableName) -> None:
    """Previous releases -> this one: add the identity, key-range and wait columns, re-key the primary key.
    Idempotent. The wait columns stay NULL on older rows (not measured then)."""
    t = sql.Identifier(*ledger.parts)
    cur.execute(sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS waited_load_s double precision").format(t=t))
    cur.execute(sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS waited_pacing_s double precision").format(t=t))
    cur.execute(sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS backfill_key text NOT NULL DEFAULT ''").format(t=t))
    cur.execute(sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS backfill jsonb").format(t=t))
    cur.execute(sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS key_column text").format(t=t))
    cur.execute(
        sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS key_lo bigint NOT NULL DEFAULT -9223372036854775808").format(
            t=t
        )
    )
    cur.execute(
        sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS key_hi bigint NOT NULL DEFAULT 9223372036854775807").format(
            t=t
        )
    )
    cur.execute(
        """SELECT c.conname, ARRAY(SELECT a.attname::text FROM pg_attribute a
                                   WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey) ORDER BY a.attname)
             FROM pg_constraint c WHERE c.conrelid = to_regclass(%s) AND c.contype = 'p'""",
        (t.as_string(cur),),
    )
    row = cur.fetchone()
    if row is not None and sorted(row[1]) == sorted(_PK):
        return
    if row is not None:
        cur.execute(sql.SQL("ALTER TABLE {t} DROP CONSTRAINT {c}").format(t=t, c=sql.Identifier(row[0])))
    cur.execute(
        sql.SQL("ALTER TABLE {t} ADD PRIMARY KEY ({k})").format(t=t, k=sql.SQL(", ").join(map(sql.Identifier, _PK)))
    )


def record(
    cur,
    ledger: TableName,
    *,
    backfill: BackfillIdentity,
    chunk_id: str,
    start,
    end,
    stats: dict,
    dag_id,
    run_id,
    key_column: str | None = None,
    key_lo: int | None = None,
    key_hi: int | None = None,
    waited_load_s: float | None = None,
    waited_pacing_s: float | None = None,
) -> None:
    """Insert or refresh this chunk's row; call inside the chunk's transaction, before commit.

    ``waited_*_s``: how long the chunk waited, deferred, for the source's load and its pacing turn before it
    read (None: not measured, e.g. a chunk of a batch)."""
    cur.execute(
        sql.SQL(
            """INSERT INTO {t} AS l (target_table, backfill_key, range_start, range_end, chunk_id, rows_extracted,
                   rows_inserted, rows_updated, rows_unchanged, seconds, dag_id, run_id, backfill,
                   key_column, key_lo, key_hi, waited_load_s, waited_pacing_s)
               VALUES (%(target)s, %(key)s, %(start)s, %(end)s, %(chunk_id)s, %(extracted)s, %(inserted)s,
                   %(updated)s, %(unchanged)s, %(seconds)s, %(dag_id)s, %(run_id)s, %(backfill)s,
                   %(key_column)s, %(key_lo)s, %(key_hi)s, %(waited_load_s)s, %(waited_pacing_s)s)
               ON CONFLICT (target_table, backfill_key, range_start, range_end, key_lo, key_hi) DO UPDATE SET
                   chunk_id = EXCLUDED.chunk_id, rows_extracted = EXCLUDED.rows_extracted,
                   rows_inserted = EXCLUDED.rows_inserted, rows_updated = EXCLUDED.rows_updated,
                   rows_unchanged = EXCLUDED.rows_unchanged, seconds = EXCLUDED.seconds,
                   dag_id = EXCLUDED.dag_id, run_id = EXCLUDED.run_id, finished_at = now(),
                   backfill = EXCLUDED.backfill, key_column = EXCLUDED.key_column,
                   waited_load_s = EXCLUDED.waited_load_s, waited_pacing_s = EXCLUDED.waited_pacing_s"""
        ).format(t=sql.Identifier(*ledger.parts)),
        {
            "target": backfill.target,
            "key": backfill.key,
            "backfill": json.dumps(backfill.description),
            "start": start,
            "end": end,
            "chunk_id": chunk_id,
            "dag_id": dag_id,
            "run_id": run_id,
            "key_column": key_column,
            "key_lo": KEY_MIN if key_lo is None else key_lo,
            "key_hi": KEY_MAX if key_hi is None else key_hi,
            "waited_load_s": waited_load_s,
            "waited_pacing_s": waited_pacing_s,
            **stats,
        },
    )


def run_totals(cur, ledger: TableName, target: str, run_id: str | None, *, dag_id: str) -> tuple[int, int]:
    """(chunks, rows) this run has recorded for ``target``, read in the chunk's own transaction (it sees
    its own row): the progress line needs no session of its own. A run is its DAG's: ``airflow backfill
    create`` names runs by date alone, so two backfill DAGs into one table have runs of the same id."""
    cur.execute(
        sql.SQL(
            "SELECT count(*), coalesce(sum(rows_extracted), 0) FROM {t}"
            " WHERE target_table = %s AND dag_id = %s AND run_id = %s"
        ).format(t=sql.Identifier(*ledger.parts)),
        (target, dag_id, run_id),
    )
    chunks, rows = cur.fetchone()
    return int(chunks), int(rows)


def is_current(conn, ledger: TableName) -> bool:
    """The ledger exists in this release's shape; if not, no range counts as done for any backfill."""
    with conn.cursor() as cur:
        cur.execute(STATE_SQL, {"ledger": sql.Identifier(*ledger.parts).as_string(cur)})
        present, keyed, _ = cur.fetchone()
    return bool(present and keyed)


def done_rects(
    conn, ledger: TableName, backfill: BackfillIdentity, key_column: str | None = None, run_id: str | None = None
):
    """This backfill's ledger rows as coverage rectangles (ledger/coverage.py); read-only. An absent or
    previous-release ledger covers nothing (its rows count as done for no backfill). Rows cut on another
    key column than ``key_column`` cover nothing here (their ranges mean other rows)."""
    from airflow_backfill_provider.ledger.coverage import rect

    if not is_current(conn, ledger):
        return []
    q = sql.SQL(
        "SELECT range_start, range_end, key_column, key_lo, key_hi FROM {t}"
        " WHERE target_table = %s AND backfill_key = %s"
    ).format(t=sql.Identifier(*ledger.parts))
    args: tuple = (backfill.target, backfill.key)
    if run_id is not None:  # a reprocess batch resuming: skip only what this run already loaded
        q = q + sql.SQL(" AND run_id = %s")
        args += (run_id,)
    with conn.cursor() as cur:
        cur.execute(q, args)
        out = []
        for a, b, col, lo, hi in cur.fetchall():
            lo = None if lo is None or lo == KEY_MIN else lo
            hi = None if hi is None or hi == KEY_MAX else hi
            if (lo is not None or hi is not None) and col != key_column:
                continue
            out.append(rect(a, b, lo, hi))
        return out


def other_claims(conn, ledger: TableName, backfill: BackfillIdentity, key_column: str | None = None):
    """Ledger rows of the same target under another backfill key, grouped: [(description, rects)].

    What the plan explains when a range it would have skipped before is loaded again (identity.explain):
    e.g. the destination was re-created, or the columns written changed. Read-only."""
    from airflow_backfill_provider.ledger.coverage import rect

    if not is_current(conn, ledger):
        return []
    q = sql.SQL(
        "SELECT backfill_key, backfill, range_start, range_end, key_column, key_lo, key_hi FROM {t}"
        " WHERE target_table = %s AND backfill_key <> %s"
    ).format(t=sql.Identifier(*ledger.parts))
    groups: dict[str, tuple[dict | None, list]] = {}
    with conn.cursor() as cur:
        cur.execute(q, (backfill.target, backfill.key))
        for key, description, a, b, col, lo, hi in cur.fetchall():
            lo = None if lo is None or lo == KEY_MIN else lo
            hi = None if hi is None or hi == KEY_MAX else hi
            if (lo is not None or hi is not None) and col != key_column:
                continue
            groups.setdefault(key, (description, []))[1].append(rect(a, b, lo, hi))
    return list(groups.values())


def measured_rate(conn, ledger: TableName, target: str, *, last: int = 50) -> tuple[float, int] | None:
    """(rows/s, chunks) over the last ``last`` non-trivial chunks into ``target`` (resolved relation, any
    backfill): what auto sizing learns from."""
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
