"""What the source's catalog says about a table and a column: cheap reads only, never a count.

- rows and pages: ``pg_class.reltuples`` / ``relpages`` (a partitioned table: the sum over its leaves);
- a column: ``pg_stats`` null fraction, histogram bounds, most common values and ``correlation``
  (how closely the column's order follows the physical order of the rows);
- an integer key's min and max (``min()``/``max()``, answered from the key's index).

Histogram bounds of a time column are read as instants with the session's TimeZone set to the spec's
timezone for the transaction, so a ``date`` or naive ``timestamp`` column means local wall time, exactly
as the chunk bounds do. The estimator functions (``fraction``, ``quantile``) are pure.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql

from airflow_backfill_provider.spec import TableName

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnStats:
    null_frac: float = 0.0
    #: equi-depth histogram bounds (epoch seconds for time columns, numbers for keys), ascending
    bounds: tuple[float, ...] = ()
    #: most common values and their frequencies (fractions of all rows)
    mcv: tuple[tuple[float, float], ...] = ()
    correlation: float | None = None

    @property
    def usable(self) -> bool:
        return len(self.bounds) >= 2 or bool(self.mcv)

    @property
    def hist_frac(self) -> float:
        return max(0.0, 1.0 - self.null_frac - sum(f for _, f in self.mcv)) if len(self.bounds) >= 2 else 0.0

    def cdf(self, x: float) -> float:
        """Fraction of histogram rows below x (linear inside a bucket)."""
        b = self.bounds
        if len(b) < 2 or x <= b[0]:
            return 0.0
        if x > b[-1]:
            return 1.0
        i = bisect.bisect_left(b, x) - 1  # b[i] < x <= b[i+1]
        width = b[i + 1] - b[i]
        inside = (x - b[i]) / width if width > 0 else 1.0
        return (i + inside) / (len(b) - 1)

    def fraction(self, a: float, z: float) -> float:
        """Estimated fraction of all rows with a <= value < z."""
        mcv = sum(f for v, f in self.mcv if a <= v < z)
        return mcv + self.hist_frac * max(0.0, self.cdf(z) - self.cdf(a))

    def quantile(self, p: float) -> float:
        """The value below which a fraction p of the histogram's rows lie (inverse of cdf)."""
        b = self.bounds
        pos = min(max(p, 0.0), 1.0) * (len(b) - 1)
        i = min(int(pos), len(b) - 2)
        return b[i] + (pos - i) * (b[i + 1] - b[i])


@dataclass(frozen=True)
class TableStats:
    #: estimated rows; None when the table was never analyzed (reltuples = -1)
    rows: float | None
    pages: int
    columns: dict = field(default_factory=dict)


_TABLE = """
SELECT sum(greatest(c.reltuples, 0))::float8, sum(c.relpages)::bigint, bool_or(c.reltuples >= 0 AND c.relkind <> 'p')
FROM (SELECT %(oid)s::regclass AS relid UNION SELECT relid FROM pg_partition_tree(%(oid)s::regclass) WHERE isleaf) r
JOIN pg_class c ON c.oid = r.relid
"""


def table_stats(conn, table: TableName) -> TableStats:
    from airflow_backfill_provider.schema import table_oid

    oid = table_oid(conn, table, side="source")
    with conn.cursor() as cur:
        cur.execute(_TABLE, {"oid": oid})
        rows, pages, analyzed = cur.fetchone()
    return TableStats(rows if analyzed else None, int(pages or 0))


def correlation(conn, table: TableName, column: str) -> float | None:
    """``pg_stats.correlation`` of one column (physical order vs the column's order); None without statistics."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT correlation::float8 FROM pg_stats WHERE schemaname = coalesce(%s, current_schema())"
            " AND tablename = %s AND attname = %s ORDER BY inherited DESC LIMIT 1",
            (table.schema_, table.name, column),
        )
        row = cur.fetchone()
    return None if row is None else row[0]


def column_stats(conn, table: TableName, column: str, *, as_time_in: str | None = None) -> ColumnStats:
    """pg_stats for one column; ``as_time_in``: read values as instants in that timezone (epoch seconds).

    A column whose values do not read as numbers/instants, or without statistics, gives an empty
    ColumnStats (``usable`` False): callers fall back and say so.
    """
    value = sql.SQL("extract(epoch FROM v::timestamptz)::float8") if as_time_in else sql.SQL("v::numeric::float8")
    query = sql.SQL(
        """SELECT null_frac::float8, correlation::float8,
                  (SELECT array_agg({value} ORDER BY o) FROM unnest(histogram_bounds::text::text[])
                     WITH ORDINALITY AS h(v, o)),
                  (SELECT array_agg({value} ORDER BY o) FROM unnest(most_common_vals::text::text[])
                     WITH ORDINALITY AS m(v, o)),
                  most_common_freqs::float8[]
           FROM pg_stats WHERE schemaname = {schema} AND tablename = {table} AND attname = {column}
           ORDER BY inherited DESC LIMIT 1"""
    ).format(
        value=value,
        schema=sql.SQL("coalesce({}, current_schema())").format(sql.Literal(table.schema_)),
        table=sql.Literal(table.name),
        column=sql.Literal(column),
    )
    was_idle = conn.autocommit or conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    try:
        with conn.cursor() as cur:
            if as_time_in:
                cur.execute("SELECT set_config('TimeZone', %s, true)", (as_time_in,))
            cur.execute(query)
            row = cur.fetchone()
    except psycopg2.Error as err:  # e.g. values that are not numbers or instants
        log.info("no usable statistics for %s.%s: %s", table, column, str(err).strip())
        conn.rollback()
        return ColumnStats()
    finally:
        if (
            was_idle
            and not conn.autocommit
            and conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE
        ):
            conn.rollback()  # the TimeZone setting was transaction-local; leave no transaction open
    if row is None:
        return ColumnStats()
    null_frac, corr, bounds, mcv_vals, mcv_freqs = row
    mcv = tuple(zip(mcv_vals or (), mcv_freqs or ()))
    return ColumnStats(float(null_frac or 0.0), tuple(bounds or ()), mcv, corr)


def key_min_max(conn, table: TableName, column: str) -> tuple[int | None, int | None]:
    """min and max of an integer key: two index probes when the key is indexed (callers check)."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT (SELECT min({c}) FROM {t}), (SELECT max({c}) FROM {t})").format(
                c=sql.Identifier(column), t=sql.Identifier(*table.parts)
            )
        )
        lo, hi = cur.fetchone()
    return lo, hi


def column_type(conn, table: TableName, column: str) -> str | None:
    """The column's type name (format_type), None if the column is missing."""
    from airflow_backfill_provider.schema import table_oid

    oid = table_oid(conn, table, side="source")
    with conn.cursor() as cur:
        cur.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s AND attname = %s"
            " AND attnum > 0 AND NOT attisdropped",
            (oid, column),
        )
        row = cur.fetchone()
    return row[0] if row else None
