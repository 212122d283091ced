"""What the source's catalog says about a table and a column: cheap reads only, never a count.

- rows and pages: ``pg_class.reltuples`` / ``relpages`` (a partitioned table: the sum over its leaves);
- a column: ``pg_stats`` null fraction, histogram bounds, most common values and ``correlation``
  (how closely the column's order follows the physical order of the rows);
- an integer key's min and max (``min()``/``max()``, answered from the key's index);
- a table never analyzed (no ``reltuples``, no ``pg_stats``): :func:`sample_stats`, the same numbers from a
  bounded ``TABLESAMPLE SYSTEM`` of a few pages (read only: a backfill never runs ANALYZE on the source).

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

from airflow_backfill_provider.core.spec import TableName

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnStats:
    null_frac: float = 0.0
    #: equi-depth histogram bounds (epoch seconds for time columns, numbers for keys), ascending
    bounds: tuple[float, ...] = ()
    #: most common values and their frequencies (fractions of all rows)
    mcv: tuple[tuple[float, float], ...] = ()
    correlation: float | None = None
    #: where the numbers come from, for the plan's notes: "pg_stats" or "a sample"
    origin: str = "pg_stats"

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
    from airflow_backfill_provider.prepare.catalog import table_oid

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
    from airflow_backfill_provider.prepare.catalog import table_oid

    oid = table_oid(conn, table, side="source")
    with conn.cursor() as cur:
        cur.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s AND attname = %s"
            " AND attnum > 0 AND NOT attisdropped",
            (oid, column),
        )
        row = cur.fetchone()
    return row[0] if row else None


#: pages a sample reads at most (TABLESAMPLE SYSTEM picks whole pages at random): ~1-2 MB of random reads
SAMPLE_PAGES = 256
#: a sample slower than this is given up (the plan then falls back to calendar days and says so)
SAMPLE_TIMEOUT_MS = 5000
#: quantiles kept from a sample: the same resolution as pg_stats' default histogram (100 buckets)
SAMPLE_BUCKETS = 100


@dataclass(frozen=True)
class Sample:
    """What a sample of a table says, standing in for missing statistics (see :func:`sample_stats`)."""

    table: TableStats
    time: ColumnStats
    key: ColumnStats
    sampled_pages: int
    sampled_rows: int
    time_bounds_from_index: bool
    seconds: float


_PAGES = """
SELECT coalesce(sum(pg_relation_size(r.relid)), 0)::bigint / current_setting('block_size')::bigint
FROM (SELECT %(oid)s::regclass AS relid UNION SELECT relid FROM pg_partition_tree(%(oid)s::regclass) WHERE isleaf) r
"""


def _quantiles(expr: sql.Composable) -> sql.Composed:
    fractions = sql.SQL(", ").join(sql.Literal(i / SAMPLE_BUCKETS) for i in range(SAMPLE_BUCKETS + 1))
    return sql.SQL("percentile_disc(ARRAY[{f}]::float8[]) WITHIN GROUP (ORDER BY {e})").format(f=fractions, e=expr)


def sample_stats(
    conn, table: TableName, time_column: str, key_column: str | None, *, timezone: str, time_indexed: bool
) -> Sample | None:
    """Rows, pages, the time column's (and an integer key's) histogram and physical-order correlation from
    a ``TABLESAMPLE SYSTEM`` of at most :data:`SAMPLE_PAGES` pages, for a table without statistics.

    - pages: the relation's size on disk (``pg_relation_size``, no read of the table);
    - rows: sampled rows per sampled page x pages;
    - histogram: 100 equi-depth buckets of the sampled values; its ends widened to the time column's true
      min and max when an index leads on it (two index probes);
    - correlation: of the sampled rows' physical order (ctid) with their value order, as ANALYZE computes it.

    Bounded: ``statement_timeout`` :data:`SAMPLE_TIMEOUT_MS` and ``lock_timeout`` for these statements
    only. Read only, no ANALYZE (a backfill must not write to or lock the source). ``REPEATABLE``: the
    same table gives the same plan twice. None when the sample found no rows or did not finish in time.
    """
    import time as _time

    from airflow_backfill_provider.prepare.catalog import table_oid

    t0 = _time.monotonic()
    was_autocommit = conn.autocommit
    was_idle = was_autocommit or conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    oid = table_oid(conn, table, side="source")
    try:
        with conn.cursor() as cur:
            # the settings below are local to this transaction (or savepoint): the caller's session keeps its own
            cur.execute("BEGIN" if was_autocommit else "SAVEPOINT backfill_sample")
            cur.execute(
                "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true),"
                " set_config('TimeZone', %s, true)",
                (str(SAMPLE_TIMEOUT_MS), str(SAMPLE_TIMEOUT_MS), timezone),
            )
            return _sample(cur, oid, table, time_column, key_column, time_indexed, t0)
    except psycopg2.Error as err:  # a timeout, a lock wait, values that are not instants: fall back, say why
        log.info("no sample of %s: %s", table, str(err).strip())
        return None
    finally:
        _end_sample(conn, was_autocommit, was_idle)


def _sample(cur, oid, table: TableName, time_column: str, key_column: str | None, time_indexed: bool, t0: float):
    import time as _time

    cur.execute(_PAGES, {"oid": oid})
    pages = int(cur.fetchone()[0] or 0)
    if pages <= 0:
        return None
    percent = min(100.0, 100.0 * SAMPLE_PAGES / pages)
    t = sql.Identifier(*table.parts)
    tv = sql.SQL("extract(epoch FROM {c}::timestamptz)::float8").format(c=sql.Identifier(time_column))
    kv = sql.SQL("{c}::float8").format(c=sql.Identifier(key_column)) if key_column else sql.SQL("NULL::float8")
    # correlation as ANALYZE computes it: the sampled rows' physical order (ctid) against their value order
    query = sql.SQL(
        """WITH s AS (
             SELECT tableoid::oid AS part, (ctid::text::point)[0] AS blk, (ctid::text::point)[1] AS pos,
                    {tv} AS tv, {kv} AS kv
             FROM {t} TABLESAMPLE SYSTEM ({pct}) REPEATABLE (0)),
           r AS (
             SELECT part, blk, tv, kv, row_number() OVER (ORDER BY part, blk, pos)::float8 AS phys,
                    CASE WHEN tv IS NOT NULL THEN rank() OVER (ORDER BY tv)::float8 END AS trank,
                    CASE WHEN kv IS NOT NULL THEN rank() OVER (ORDER BY kv)::float8 END AS krank
             FROM s)
           SELECT count(*), count(tv), count(DISTINCT (part, blk)), corr(trank, phys), {tq},
                  count(kv), corr(krank, phys), {kq}
           FROM r"""
    ).format(tv=tv, kv=kv, t=t, pct=sql.Literal(percent), tq=_quantiles(sql.SQL("tv")), kq=_quantiles(sql.SQL("kv")))
    cur.execute(query)
    n, n_time, n_pages, t_corr, t_bounds, n_key, k_corr, k_bounds = cur.fetchone()
    if not n:
        return None
    t_bounds = list(t_bounds or ())
    from_index = False
    if time_indexed and t_bounds:  # the sample's extremes lie inside the true ones: two index probes widen them
        c = sql.Identifier(time_column)
        cur.execute(
            sql.SQL(
                "SELECT (SELECT {v} FROM {t} WHERE {c} IS NOT NULL ORDER BY {c} LIMIT 1),"
                " (SELECT {v} FROM {t} WHERE {c} IS NOT NULL ORDER BY {c} DESC LIMIT 1)"
            ).format(v=tv, t=t, c=c)
        )
        tmin, tmax = cur.fetchone()
        if tmin is not None and tmax is not None:
            t_bounds[0], t_bounds[-1] = min(t_bounds[0], tmin), max(t_bounds[-1], tmax)
            from_index = True
    time_stats = ColumnStats(
        null_frac=1.0 - n_time / n,
        bounds=tuple(t_bounds) if n_time else (),
        correlation=None if t_corr is None else float(t_corr),
        origin="a sample",
    )
    key_stats = ColumnStats(
        null_frac=1.0 - n_key / n,
        bounds=tuple(k_bounds or ()) if n_key else (),
        correlation=None if k_corr is None else float(k_corr),
        origin="a sample",
    )
    return Sample(
        # rows per sampled page x pages, as ANALYZE estimates reltuples (pages with no live row are not
        # seen, so a table with many emptied pages is overestimated; n / fraction varies ~6% more with the
        # number of pages TABLESAMPLE happens to pick)
        table=TableStats(n / max(1, n_pages) * pages, pages),
        time=time_stats,
        key=key_stats if key_column else ColumnStats(),
        sampled_pages=int(n_pages),
        sampled_rows=int(n),
        time_bounds_from_index=from_index,
        seconds=_time.monotonic() - t0,
    )


def _end_sample(conn, was_autocommit: bool, was_idle: bool) -> None:
    """Undo the sample's local settings; leave the connection as it was found (no transaction opened)."""
    if conn.closed:
        return
    if was_autocommit:
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")
    elif was_idle:
        conn.rollback()
    else:
        with conn.cursor() as cur:
            cur.execute("ROLLBACK TO SAVEPOINT backfill_sample")  # also clears an error inside it
            cur.execute("RELEASE SAVEPOINT backfill_sample")
