"""Is the source table being vacuumed or analyzed right now? Then a chunk waits (deferred).

A chunk that reads a table while VACUUM (or ANALYZE, or VACUUM FULL/CLUSTER) runs on it competes for
the same pages and I/O: both get slower, and on a busy primary the vacuum falls behind. The chunk
checks PostgreSQL's progress views for the source table (and its partitions) before it reads, and
waits in the triggerer while one is running, bounded by ``throttle.max_wait`` like the load wait.

The progress views show other users' rows only to superusers and members of ``pg_read_all_stats``
(``pg_monitor``): grant it to the source user, as for the load probe.
"""

from __future__ import annotations

from psycopg2 import sql

from airflow_backfill_provider.core.spec import TableName

_QUERY = sql.SQL(
    # to_regclass: a missing table is not "busy"; the chunk's pre-flight names it (a permanent error)
    """WITH rels AS (SELECT to_regclass({t}) AS relid UNION SELECT relid FROM pg_partition_tree(to_regclass({t})))
    SELECT 'VACUUM (' || phase || ')', pid FROM pg_stat_progress_vacuum WHERE relid IN (SELECT relid FROM rels)
    UNION ALL SELECT 'ANALYZE (' || phase || ')', pid FROM pg_stat_progress_analyze WHERE relid IN (SELECT relid FROM rels)
    UNION ALL SELECT command || ' (' || phase || ')', pid FROM pg_stat_progress_cluster WHERE relid IN (SELECT relid FROM rels)"""
)


def running(conn, table: TableName) -> list[str]:
    """What maintenance runs on ``table`` now, e.g. ``['VACUUM (scanning heap) pid 4242']``; [] when none.

    On a non-autocommit session it runs in the caller's transaction (the chunk's COPY follows in the same
    one, read committed: no snapshot is held over), sparing a round trip per chunk.
    """
    with conn.cursor() as cur:
        cur.execute(_QUERY.format(t=sql.Literal(sql.Identifier(*table.parts).as_string(conn))))
        rows = cur.fetchall()
    return [f"{what} pid {pid}" for what, pid in rows]
