"""The live-ingest watermark, as the backfill sees it: read, never written.

Live ingest keeps one row per target table in a small destination table. The backfill only reads
it, to clip (or refuse) its range: live ingest owns everything at or after the watermark. There is
deliberately no write function here; the live operator owns the only writer (``live.py``).
"""

from __future__ import annotations

import datetime as dt

from psycopg2 import sql

from airflow_backfill_provider import ddl

from airflow_backfill_provider.spec import TableName

WATERMARK_COLUMNS = "target_table text PRIMARY KEY, watermark timestamptz NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()"


def read_watermark(conn, table: TableName, target: str) -> dt.datetime | None:
    """The watermark for ``target``, or None if live ingest has not run (no table or no row)."""
    with conn.cursor() as cur:
        if not ddl.exists(cur, table):
            return None
        cur.execute(
            sql.SQL("SELECT watermark FROM {t} WHERE target_table = %s").format(t=sql.Identifier(*table.parts)),
            (target,),
        )
        row = cur.fetchone()
    return row[0] if row else None
