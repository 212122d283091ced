"""The provider's own small tables (ledger, validation report, watermark, parallel table): exists / create.

One mechanism for all of them: an existing table costs one lock-free ``to_regclass`` lookup; a missing
one is created in its own short transaction under one shared advisory lock, because parallel chunks
(or a plan and its chunks) race on ``CREATE TABLE IF NOT EXISTS`` and would otherwise fail on pg_type.
"""

from __future__ import annotations

from typing import Callable

from psycopg2 import sql

from airflow_backfill_provider.core.spec import TableName

# the advisory-lock key every release shares (not a module path: moving core/ddl.py must not change it)
DDL_LOCK = "airflow_backfill_provider.ddl"  # relayout: keep


def exists(cur, table: TableName) -> bool:
    cur.execute("SELECT to_regclass(%s)", (sql.Identifier(*table.parts).as_string(cur),))
    return cur.fetchone()[0] is not None


def run_locked(conn, table: TableName, create: sql.Composable | Callable) -> None:
    """Run ``create`` (idempotent DDL for ``table``) under the DDL lock, creating its schema; commit.

    ``create`` may be a function of the cursor, for DDL that must look at the catalog first (migrations,
    "create unless a foreign table is there"); it runs under the lock, in the same transaction.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (DDL_LOCK,))
        if table.schema_:
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.schema_)))
        if callable(create):
            create(cur)
        else:
            cur.execute(create)
    conn.commit()


def ensure_table(conn, table: TableName, columns: sql.Composable) -> None:
    """``CREATE TABLE IF NOT EXISTS table (columns)``, only when the table is missing.

    ``columns`` is a constant column list of this package, never user input.
    """
    with conn.cursor() as cur:
        if exists(cur, table):
            return
    run_locked(
        conn, table, sql.SQL("CREATE TABLE IF NOT EXISTS {t} ({c})").format(t=sql.Identifier(*table.parts), c=columns)
    )
