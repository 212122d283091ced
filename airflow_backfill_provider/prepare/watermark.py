"""The live-ingest watermark, as the backfill sees it: read, never written.

Live ingest keeps one row per target table in a small destination table. The backfill only reads
it, to clip (or refuse) its range: live ingest owns everything at or after the watermark. There is
deliberately no write function here; the live operator owns the only writer (``live.py``).
"""

from __future__ import annotations

import datetime as dt

from psycopg2 import sql

from airflow_backfill_provider.core import ddl
from airflow_backfill_provider.prepare import identity
from airflow_backfill_provider.core.spec import TableName

#: ``source``: which source live ingest reads for this target (database identity + resolved relation); a
#: second live ingest from another source into the same target is refused (it would skip rows)
WATERMARK_COLUMNS = (
    "target_table text PRIMARY KEY, watermark timestamptz NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),"
    " source text"
)


def target_key(conn, destination: TableName) -> str:
    """The watermark row's key: the destination relation resolved on ``conn`` (``public.orders``), so specs
    spelling it ``orders`` and ``public.orders`` share one watermark."""
    return identity.resolve(conn, destination, side="destination", missing_ok=True)


def read_watermark(conn, table: TableName, destination: TableName) -> dt.datetime | None:
    """The watermark for ``destination``, or None if live ingest has not run (no table or no row).

    A row keyed by the previous release (the name as the spec spelled it) is read when no row is keyed
    by the resolved relation yet; the next live run re-keys it (``live.lock_watermark``).
    """
    with conn.cursor() as cur:
        if not ddl.exists(cur, table):
            return None
        resolved = target_key(conn, destination)
        cur.execute(
            sql.SQL(
                "SELECT watermark FROM {t} WHERE target_table IN (%s, %s) ORDER BY target_table = %s DESC LIMIT 1"
            ).format(t=sql.Identifier(*table.parts)),
            (resolved, str(destination), resolved),
        )
        row = cur.fetchone()
    return row[0] if row else None
