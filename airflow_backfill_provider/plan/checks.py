"""Pre-flight data checks the plan runs on the source, read-only and bounded.

NULL in the time column: such a row is in no half-open chunk ``[start, end)`` (``NULL >= x`` is never
true), so no backfill ever loads it, silently. The plan cannot fix that (which day is a NULL?), but it
must say so: it warns with a count, so the owner can fix the rows or load them separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

from airflow_backfill_provider.core.spec import TableName

#: the exact count may scan the table: bounded so a plan never loads the production source for long
COUNT_TIMEOUT_MS = 5000

_NOT_NULL = """
SELECT a.attnotnull FROM pg_attribute a
WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped
"""

# planner statistics: free, approximate, available when the exact count is too slow
_ESTIMATE = """
SELECT round(s.null_frac * greatest(c.reltuples, 0))::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = %s
WHERE c.oid = to_regclass(%s)
"""


@dataclass(frozen=True)
class NullTimeRows:
    table: str
    column: str
    count: int | None  # None: unknown (no statistics and the count timed out)
    exact: bool

    @property
    def message(self) -> str | None:
        """A warning to log, or None when there is nothing to say."""
        if self.count == 0:
            return None
        how = "" if self.exact else "about "
        n = "an unknown number of" if self.count is None else f"{how}{self.count}"
        return (
            f"source table {self.table!r} has {n} row(s) with NULL in the time column {self.column!r}: "
            "they are in no [start, end) chunk and will NOT be backfilled; fill the time column "
            "(or load those rows separately) if they matter"
        )


def null_time_rows(src_conn, table: TableName, time_column: str, *, exact: bool = True) -> NullTimeRows:
    """Count rows of ``table`` whose time column is NULL; 0 at once if the column is NOT NULL.

    ``exact=False`` (no index on the time column: a count would scan the table) uses statistics only.
    """
    regclass = sql.Identifier(*table.parts).as_string(src_conn)
    with src_conn.cursor() as cur:
        cur.execute(_NOT_NULL, (regclass, time_column))
        row = cur.fetchone()
        if row is not None and row[0]:
            return NullTimeRows(str(table), time_column, 0, True)
        if exact:
            count = _bounded_count(cur, table, time_column)
            if count is not None:
                return NullTimeRows(str(table), time_column, count, True)
        cur.execute(_ESTIMATE, (time_column, regclass))
        row = cur.fetchone()
        return NullTimeRows(str(table), time_column, row[0] if row else None, False)


def _bounded_count(cur, table: TableName, time_column: str) -> int | None:
    """The exact count, or None if it takes longer than COUNT_TIMEOUT_MS."""
    cur.execute("SAVEPOINT null_time_count")
    try:
        # an index on the time column (chunks need one anyway) makes this an index-only scan
        cur.execute("SET LOCAL statement_timeout = %s", (COUNT_TIMEOUT_MS,))
        cur.execute(
            sql.SQL("SELECT count(*) FROM {t} WHERE {c} IS NULL").format(
                t=sql.Identifier(*table.parts), c=sql.Identifier(time_column)
            )
        )
        count = cur.fetchone()[0]
    except psycopg2.errors.QueryCanceled:
        count = None
    cur.execute("ROLLBACK TO SAVEPOINT null_time_count")  # also undoes SET LOCAL for later queries
    return count
