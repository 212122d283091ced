"""Validation: compare source and destination per local day, after a backfill.

For every day of the backfilled half-open range ``[start, end)`` (days in the spec's timezone) both
sides are asked for ``count(*)`` and ``sum(col)`` of the configured numeric columns. The source side
reads the transfer's table (or the historical table of that date range) and column expressions,
cast to the destination's types. So a difference means rows were lost, duplicated or changed, not
that validation looked elsewhere.

Independent of the chunk path: days, range edges and the time column's type are worked out here, in
SQL, by the column's own type (``d`` for a ``date``; ``ts::date`` for a naive ``timestamp``, which is
local wall time; ``(tstz AT TIME ZONE '<spec tz>')::date`` for ``timestamptz``), never through the
chunk filter's bound code (core/timebounds.py). So a chunk filter that reads the wrong rows shows up here as
a day that differs. With ``validation.checksum`` (default 'fail') each day also compares an
order-independent checksum of every loaded column, the source side cast to the destination types, so an
altered value is named even when counts and sums agree: ``sum(hash_record_extended(ROW(..), 0))`` over
the values by type where both servers are PostgreSQL 14+ (common built-in types hashed as values, text
byte by byte, numeric/float/jsonb by their send form so that "equal" means what the upsert's change test
means, docs/equality.md; every other type as its text), else ``sum(hashtextextended(ROW(..)::text, 0))`` over the
row's text (about twice the CPU). Both sessions pin TimeZone, DateStyle, IntervalStyle,
extra_float_digits and bytea_output for the text (SET LOCAL, inside validation's own read transaction).

Relative difference of a metric on a day: ``|source - destination| / |source|`` (the source is the
truth); if the source is 0 it is relative to the destination, so a day present on only one side is a
100% difference. A day passes at or under ``warn_threshold``, fails over ``fail_threshold``, warns in
between. Rows outside ``[start, end)`` (live ingest, earlier loads) are never counted.

Queries run per calendar month (and split at historical boundaries), so each source statement stays
short and under the spec's ``statement_timeout``; the source session is read-only. On a side whose time
column is not in physical order (``pg_stats.correlation`` under 0.5; a destination without statistics
yet follows the source) every month's statement would read pages from all over the table, so that side
runs one read of the whole range (still split at historical boundaries) instead of one per month. On
PostgreSQL 14+ a plain table is read in slices of physical blocks (TID range scans, ~``SLICE_ROWS`` rows
each, the last one open-ended), all in one REPEATABLE READ snapshot: each statement stays short and under
``statement_timeout`` however large the table, and a row moved by a concurrent update is still counted
exactly once. The source and destination statements run at the same time (two sessions).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation, localcontext

import pendulum
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from airflow_backfill_provider.core import ddl
from airflow_backfill_provider.prepare import catalog as schema, drift
from airflow_backfill_provider.core.chunks import iter_chunks, split_at, to_datetime, utc
from airflow_backfill_provider.connections import close_all, open_destination, open_source
from airflow_backfill_provider.core.exceptions import PermanentChunkError, PlanError, ValidationTimeout
from airflow_backfill_provider.core.spec import BackfillSpec, TableName
from airflow_backfill_provider.prepare.source import source_for

log = logging.getLogger(__name__)

PASS, WARN, FAIL = "pass", "warn", "fail"
_RANK = {PASS: 0, WARN: 1, FAIL: 2}
#: how many days the readable table shows; the rest are counted in one line
TABLE_MAX_LINES = 30
#: failing days listed by name in the XCom totals (it must stay small)
XCOM_MAX_DAYS = 10
_SEGMENT = "month"  # one source statement per month: short statements, few round trips


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
@dataclass
class DayResult:
    day: dt.date
    source_rows: int
    destination_rows: int
    #: column -> (source sum, destination sum); None when every value is NULL (or no rows)
    sums: dict[str, tuple[Decimal | None, Decimal | None]]
    #: metric ("rows" or "sum(col)") -> relative difference (0.0 .. ); "checksum": 0.0 equal, 1.0 not
    diffs: dict[str, float]
    status: str = PASS
    #: (source, destination) order-independent checksum of the loaded columns; None when disabled
    checksum: tuple[Decimal | None, Decimal | None] | None = None

    @property
    def checksum_differs(self) -> bool:
        return self.checksum is not None and self.checksum[0] != self.checksum[1]

    @property
    def worst_metric(self) -> str:
        # a count or sum that differs says more than the checksum (which only says "something differs")
        measured = {m: x for m, x in self.diffs.items() if m != "checksum" and x > 0}
        pool = measured or self.diffs
        return max(pool, key=lambda m: pool[m])

    @property
    def worst_diff(self) -> float:
        return max(self.diffs.values())


@dataclass
class ValidationReport:
    table: str
    timezone: str
    range_start: pendulum.DateTime
    range_end: pendulum.DateTime
    warn_threshold: float
    fail_threshold: float
    sum_columns: list[str]
    days: list[DayResult]
    #: how the source side was read (historical tables/expressions, NULL columns); logged once
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return max((d.status for d in self.days), key=_RANK.__getitem__, default=PASS)

    def count(self, status: str) -> int:
        return sum(1 for d in self.days if d.status == status)

    @property
    def worst(self) -> DayResult | None:
        return self.ranked()[0] if self.days else None

    def ranked(self) -> list[DayResult]:
        """Worst days first: by status, then by largest relative difference, then by date."""
        return sorted(self.days, key=lambda d: (-_RANK[d.status], -d.worst_diff, d.day))

    def totals(self) -> dict:
        """Small JSON-safe dict for XCom and the summary row."""
        worst = self.worst if self.worst and self.worst.worst_diff > 0 else None  # no "worst" of equal days
        sums = {}
        for col in self.sum_columns:
            s = _sum_days(d.sums[col][0] or 0 for d in self.days)
            t = _sum_days(d.sums[col][1] or 0 for d in self.days)
            sums[col] = {"source": _finite_or_text(float(s)), "destination": _finite_or_text(float(t))}
        failed = [d.day.isoformat() for d in self.ranked() if d.status == FAIL]
        return {
            "status": self.status,
            "table": self.table,
            "range_start": self.range_start.isoformat(),
            "range_end": self.range_end.isoformat(),
            "timezone": self.timezone,
            "days": len(self.days),
            "days_warn": self.count(WARN),
            "days_fail": self.count(FAIL),
            "source_rows": sum(d.source_rows for d in self.days),
            "destination_rows": sum(d.destination_rows for d in self.days),
            "sums": sums,
            "worst_day": worst.day.isoformat() if worst else None,
            "worst_metric": worst.worst_metric if worst else None,
            "worst_diff": _finite_or_text(round(worst.worst_diff, 6)) if worst else 0.0,
            "checksum_days_differ": [d.day.isoformat() for d in self.ranked() if d.checksum_differs][:XCOM_MAX_DAYS],
            "failed_days": failed[:XCOM_MAX_DAYS],
            "failed_days_more": max(0, len(failed) - XCOM_MAX_DAYS),
        }

    def format_table(self, max_lines: int = TABLE_MAX_LINES) -> str:
        """The per-day table for the task log, worst days first, capped at ``max_lines`` days."""
        head = (
            f"Validation of {self.table} [{self.range_start.isoformat()}, {self.range_end.isoformat()}) "
            f"per day in {self.timezone}: {self.status.upper()} - {len(self.days)} days, "
            f"{self.count(FAIL)} fail, {self.count(WARN)} warn, {self.count(PASS)} pass "
            f"(warn > {_pct(self.warn_threshold)}, fail > {_pct(self.fail_threshold)})"
        )
        headers = ["day", "status", "src rows", "dst rows", "rows diff"]
        for col in self.sum_columns:
            headers += [f"src sum({col})", f"dst sum({col})", f"sum({col}) diff"]
        with_checksum = any(d.checksum is not None for d in self.days)
        if with_checksum:
            headers.append("checksum")
        ranked = self.ranked()
        rows = []
        for d in ranked[:max_lines]:
            row = [
                d.day.isoformat(),
                d.status.upper(),
                str(d.source_rows),
                str(d.destination_rows),
                _pct(d.diffs["rows"]),
            ]
            for col in self.sum_columns:
                s, t = d.sums[col]
                row += [_num(s), _num(t), _pct(d.diffs[f"sum({col})"])]
            if with_checksum:
                row.append("DIFFERS" if d.checksum_differs else "equal")
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        # numbers right-aligned, day/status left-aligned
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines = [head, *(f"  source read: {n}" for n in self.notes)]
        lines += [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
        rest = ranked[max_lines:]
        if rest:
            kinds = ", ".join(f"{n} {s}" for s in (FAIL, WARN, PASS) if (n := sum(1 for d in rest if d.status == s)))
            lines.append(f"... and {len(rest)} more days ({kinds})")
        if not self.days:
            lines.append("(no rows on either side in this range)")
        return "\n".join(lines)


def _pct(x: float) -> str:
    if not math.isfinite(x):  # NaN or Infinity against another value: no percentage says how far
        return "differs"
    return f"{x * 100:.2f}%" if x < 10 else f"{x * 100:.0f}%"


def _num(x: Decimal | None) -> str:
    return "NULL" if x is None else str(x)


def relative_diff(source, destination) -> float:
    """``|s - d| / |s|``; relative to the destination when the source is 0; 0 when both are 0 (or NULL).

    NaN and +-Infinity (a float8 or numeric sum can be either) compare as values: 0 when both sides hold the
    same one, else ``math.inf``, a difference no threshold accepts (there is no "how much" between them).
    """
    s = Decimal(source or 0)
    d = Decimal(destination or 0)
    if not (s.is_finite() and d.is_finite()):
        # compare_total: NaN equals NaN (== says it does not), Infinity equals only Infinity of the same sign
        return 0.0 if s.compare_total(d) == 0 else math.inf
    if s == d:
        return 0.0
    base = abs(s) if s != 0 else abs(d)
    return float(abs(s - d) / base)


def classify(diff: float, warn: float, fail: float) -> str:
    # written so that a NaN difference (which compares false with everything) fails instead of passing
    if not diff <= fail:
        return FAIL
    if not diff <= warn:
        return WARN
    return PASS


def _finite_or_text(x: float) -> float | str:
    """JSON has no NaN or Infinity (json.dumps writes tokens jsonb and strict parsers reject): name them."""
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")  # also float8 input syntax


def _sum_days(values) -> Decimal:
    """The days' sums added up; Infinity + -Infinity gives NaN instead of raising InvalidOperation."""
    with localcontext() as ctx:
        ctx.traps[InvalidOperation] = False
        return sum(values, Decimal(0))


# ----------------------------------------------------------------------------------------------
# SQL
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SideQuery:
    """How one side is read for a segment of the range: table, time expression, sums, checksum row."""

    table: TableName
    time_expr: sql.Composable  # what is bucketed and range-filtered on this side
    time_kind: str  # date / timestamp / timestamptz of time_expr on this side
    sums: tuple[sql.Composable, ...]
    row: tuple[sql.Composable, ...] = ()  # the loaded columns, for the checksum (empty: no checksum)
    row_types: tuple[str | None, ...] = ()  # each row column's comparable type (None: not known)
    #: hash the row's values by type (``hash_record_extended``), not its text: both servers 14+ (checksum_method)
    typed_hash: bool = False


#: comparable types hashed as values by ``hash_record_extended``: built in, with a hash function that
#: equal values (the source's cast to the same type) give equally on every server; text types compared
#: byte by byte (COLLATE "C": a case-insensitive collation's hash would hide a changed case). Every other
#: type (arrays, json, geometric, money, enum-as-text ...) goes in as its text, as before.
_TYPED_HASH = {
    "smallint", "integer", "bigint", "numeric", "real", "double precision", "boolean", "date", "uuid", "bytea",
    "time without time zone", "timestamp without time zone", "timestamp with time zone", "jsonb",
}  # fmt: skip
_BYTEWISE = {"text", "character varying", "character"}
#: types whose '=' and hash ignore a difference the upsert's change test rewrites (casts.change_test compares
#: their binary send form): 1.5 vs 1.50000, 0 vs -0, jsonb 10.5 vs 10.50000. Hashed by that same send form, so
#: validation and the upsert mean the same by "equal" (docs/equality.md)
_BY_SEND = {"numeric": "numeric_send", "real": "float4send", "double precision": "float8send", "jsonb": "jsonb_send"}


def checksum_method(src_conn, dst_conn) -> str:
    """``typed``: both servers have ``hash_record_extended`` (PostgreSQL 14+); else ``text``, the row's text
    hashed (about twice the CPU: every value goes through its output function)."""
    return "typed" if min(src_conn.server_version, dst_conn.server_version) >= 140000 else "text"


def _hash_field(expr: sql.Composable, comparable: str | None) -> sql.Composable:
    base = re.sub(r"\(\d+(,\d+)?\)", "", comparable or "")
    if base in _BY_SEND:  # a bytea, hashed by its bytes
        return sql.SQL("{f}({e})").format(f=sql.Identifier("pg_catalog", _BY_SEND[base]), e=expr)
    if base in _TYPED_HASH:
        return expr
    if base in _BYTEWISE:
        return sql.SQL('({e}) COLLATE "C"').format(e=expr)
    return sql.SQL("({e})::text").format(e=expr)


_OID_KINDS = {1082: "date", 1114: "timestamp", 1184: "timestamptz"}


def time_kind(conn, table: TableName, expr: sql.Composable) -> str:
    """The type the server computes for ``expr`` (``LIMIT 0`` reads no row); validation's own answer."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {e} FROM {t} LIMIT 0").format(e=expr, t=sql.Identifier(*table.parts)))
        oid = cur.description[0][1]
    if oid not in _OID_KINDS:
        raise PermanentChunkError(
            f"validation: the time column of {table} is not a date, timestamp or timestamptz (type oid {oid})"
        )
    return _OID_KINDS[oid]


def _first_date_at_or_after(p: str) -> sql.Composed:
    """SQL: the first local date (spec tz) whose midnight is at or after the instant ``%(p)s``."""
    return sql.SQL(
        "(SELECT CASE WHEN (x::timestamp AT TIME ZONE %(tz)s) < {p}::timestamptz THEN x + 1 ELSE x END"
        " FROM (SELECT ({p}::timestamptz AT TIME ZONE %(tz)s)::date AS x) AS b)"
    ).format(p=sql.Placeholder(p))


def per_day_sql(side: SideQuery, blocks: tuple[int, int | None] | None = None) -> sql.Composed:
    """``SELECT day, count(*), sum(..).., [checksum] FROM (<per row> FROM t WHERE <in [lo, hi)>) GROUP BY 1``.

    The day and the range test follow the time expression's own type, in the spec's timezone
    (parameter ``tz``; ``lo``/``hi`` are instants): a ``date`` is its local day (and is in the range
    when its local midnight is), a ``timestamp`` is local wall time, a ``timestamptz`` an instant.
    ``blocks``: only the table's physical blocks ``[lo, hi)`` (hi None: to the end), see :func:`block_slices`.
    """
    v = side.time_expr
    if side.time_kind == "date":
        day = sql.SQL("({v})").format(v=v)
        lo, hi = _first_date_at_or_after("lo"), _first_date_at_or_after("hi")
    elif side.time_kind == "timestamp":
        day = sql.SQL("({v})::date").format(v=v)
        lo = sql.SQL("(%(lo)s::timestamptz AT TIME ZONE %(tz)s)")
        hi = sql.SQL("(%(hi)s::timestamptz AT TIME ZONE %(tz)s)")
    else:
        day = sql.SQL("(({v}) AT TIME ZONE %(tz)s)::date").format(v=v)
        lo, hi = sql.SQL("%(lo)s::timestamptz"), sql.SQL("%(hi)s::timestamptz")
    # per row: the day, each summed value and the row's hash; summed per day above an OFFSET 0 fence. The
    # planner cannot estimate how many days an expression of the time column has (it takes the column's
    # distinct values: one group per row), so without the fence it sorts every wide row (spilling to disk)
    # to group them; behind it, it hashes ~one group per day over narrow rows (~2.5x less CPU, measured)
    values = [sql.SQL("{day} AS day").format(day=day)]
    values += [sql.SQL("{e} AS {n}").format(e=e, n=sql.Identifier(f"s{i}")) for i, e in enumerate(side.sums)]
    # sums as numeric: exact, added up across segments in Python as Decimal (a money sum would read as text)
    metrics = [sql.SQL("count(*)")]
    metrics += [sql.SQL("sum({n})::numeric").format(n=sql.Identifier(f"s{i}")) for i in range(len(side.sums))]
    if side.row:
        if side.typed_hash:  # the row's values by type
            types = side.row_types or (None,) * len(side.row)
            fields = [_hash_field(e, t) for e, t in zip(side.row, types, strict=True)]
            h = sql.SQL("hash_record_extended(ROW({r}), 0)").format(r=sql.SQL(", ").join(fields))
        else:  # the row's text
            h = sql.SQL("hashtextextended(ROW({r})::text, 0)").format(r=sql.SQL(", ").join(side.row))
        values.append(sql.SQL("{h} AS h").format(h=h))
        # order-independent: a sum of per-row hashes (numeric: no overflow)
        metrics.append(sql.SQL("sum(h)"))
    where = [sql.SQL("{v} >= {lo} AND {v} < {hi}").format(v=v, lo=lo, hi=hi)]
    if blocks is not None:
        where.append(sql.SQL("ctid >= {b}::tid").format(b=sql.Literal(f"({blocks[0]},0)")))
        if blocks[1] is not None:
            where.append(sql.SQL("ctid < {b}::tid").format(b=sql.Literal(f"({blocks[1]},0)")))
    return sql.SQL(
        "SELECT day, {metrics} FROM (SELECT {values} FROM {t} WHERE {where} OFFSET 0) AS r GROUP BY 1"
    ).format(
        metrics=sql.SQL(", ").join(metrics),
        values=sql.SQL(", ").join(values),
        t=sql.Identifier(*side.table.parts),
        where=sql.SQL(" AND ").join(where),
    )


#: a side read whole is read in slices of about this many rows (block_slices)
SLICE_ROWS = 2_000_000
#: rows per block assumed for a table without statistics (narrow rows: slices err on the small side)
_ROWS_PER_BLOCK_UNKNOWN = 100.0


def _read(conn, statement, params: dict, *, side: str, table: TableName, timeout_s: float) -> list:
    """One validation statement; past the session's statement_timeout: a ValidationTimeout naming the fix."""
    t0 = time.monotonic()
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()
    except psycopg2.errors.QueryCanceled as err:
        # told apart from another cancel by the time it took: the message is in the server's lc_messages language
        if time.monotonic() - t0 < timeout_s:
            raise
        raise ValidationTimeout(
            f"validation's statement on the {side} table {str(table)!r} ran past statement_timeout_s "
            f"({timeout_s:g} s), so would again on a retry: raise statement_timeout_s in the spec for a table this "
            "size, or validate a shorter range (ValidateBackfillOperator start/end)"
        ) from err


def _block_ranges(slices: list[tuple[int, int | None]] | None) -> list[tuple[int, int | None] | None]:
    """The statements of one segment: a slice each, or one over the whole table (None)."""
    return [*slices] if slices else [None]


def block_slices(conn, table: TableName) -> list[tuple[int, int | None]] | None:
    """Physical block ranges ``[lo, hi)`` that cover ``table`` (the last one open-ended, for blocks added since),
    each about ``SLICE_ROWS`` rows; None where one statement reads it: before PostgreSQL 14 (no TID range scan:
    each slice would read the whole table), not a plain table (a view, a partitioned table), or one slice."""
    if conn.server_version < 140000:
        return None
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.relkind, c.relpages, c.reltuples::float8,"
            " pg_relation_size(c.oid) / current_setting('block_size')::bigint"
            " FROM pg_class c WHERE c.oid = to_regclass(%s)",
            (sql.Identifier(*table.parts).as_string(cur),),
        )
        row = cur.fetchone()
    if row is None or row[0] != "r":
        return None
    _, relpages, reltuples, blocks = row
    per_block = reltuples / relpages if relpages > 0 and reltuples > 0 else _ROWS_PER_BLOCK_UNKNOWN
    step = max(1, int(SLICE_ROWS / per_block))
    if blocks <= step:
        return None
    starts = list(range(0, blocks, step))
    return [(lo, lo + step) for lo in starts[:-1]] + [(starts[-1], None)]


def source_query(
    spec: BackfillSpec,
    dest_cols: list[schema.Column],
    src_cols: list[schema.Column],
    table: TableName,
    expressions: dict[str, str],
    notes: list[str],
    conn=None,
    comparable: dict[str, str] | None = None,
    loaded: list[str] | None = None,
) -> SideQuery:
    """Source side: the transfer's table and column expressions (:func:`drift.plan_columns`), cast to
    the destination columns' comparable types (``comparable``, from :func:`comparable_types`; without
    it, to the destination types themselves); the time expression's type asked from the source (``conn``)."""
    plan = drift.plan_columns(spec, dest_cols, src_cols, expressions=expressions)
    checked = [c for c in plan.columns if loaded is None or c in loaded]
    not_loaded = [c for c in spec.validation.sum_columns if c not in plan.columns]
    if not_loaded:
        raise PermanentChunkError(
            f"validation.sum_columns {not_loaded} are not loaded by the backfill (spec.columns is "
            f"{plan.columns}); add them to columns or remove them from validation.sum_columns"
        )
    for decision in plan.decisions:
        _note(notes, f"{table}: {decision}")
    types = comparable or {}

    def value(column: str) -> sql.Composable:
        # the source value as the comparable type of the destination column (see comparable_types):
        # a type only the destination has (enum, domain, citext) cannot be named on the source
        i = plan.columns.index(column)
        if column not in types:
            return plan.select_exprs[i]
        raw = plan.raw_exprs[i]
        return sql.SQL("({r})::{t}").format(r=raw if raw is not None else sql.SQL("NULL"), t=sql.SQL(types[column]))

    return SideQuery(
        table=table,
        time_expr=plan.time_filter,
        time_kind=time_kind(conn, table, plan.time_filter),
        sums=tuple(value(c) for c in spec.validation.sum_columns),
        row=tuple(value(c) for c in checked) if spec.validation.checksum != "off" else (),
        row_types=tuple(types.get(c) for c in checked) if spec.validation.checksum != "off" else (),
    )


def _loaded_columns(spec: BackfillSpec, dest_cols, src_conn, cache: dict) -> list[str]:
    """The destination columns every source range writes (drift.written_columns): the checksum compares
    these; a column the destination fills itself (a default, an identity, generated) is not the source's."""
    ranges: list[tuple[TableName, dict[str, str]]] = [(spec.source, {})] + [
        (TableName.parse(r.source_table) if r.source_table else spec.source, dict(r.column_expressions))
        for r in spec.historical
    ]
    out: list[str] | None = None
    for table, expressions in ranges:
        if table not in cache:
            cache[table] = schema.table_columns(src_conn, table, side="source")
        written, _ = drift.written_columns(spec, dest_cols, {c.name for c in cache[table]}, expressions)
        out = written if out is None else [c for c in out if c in written]
    return out or []


def destination_query(
    spec: BackfillSpec,
    table: TableName,
    dest_cols: list[schema.Column],
    conn=None,
    comparable: dict[str, str] | None = None,
    loaded: list[str] | None = None,
) -> SideQuery:
    names = {c.name: c.type_sql for c in dest_cols}
    types = comparable or {}

    def value(column: str) -> sql.Composable:
        c = sql.Identifier(column)
        return sql.SQL("{c}::{t}").format(c=c, t=sql.SQL(types[column])) if column in types else c

    missing = [c for c in [spec.time_column, *spec.validation.sum_columns] if c not in names]
    if missing:
        raise PermanentChunkError(
            f"destination table {str(table)!r} has no column(s) {missing} (time_column / validation.sum_columns); "
            f"its columns are {sorted(names)}"
        )
    t = sql.Identifier(spec.time_column)
    if loaded is None:  # the transfer's column list (drift.plan_columns): what every source range writes
        loaded = spec.columns or [c.name for c in dest_cols if not c.generated]
    return SideQuery(
        table=table,
        time_expr=t,
        time_kind=time_kind(conn, table, t),
        sums=tuple(value(c) for c in spec.validation.sum_columns),
        row=tuple(value(c) for c in loaded) if spec.validation.checksum != "off" else (),
        row_types=tuple(types.get(c) for c in loaded) if spec.validation.checksum != "off" else (),
    )


_TYPE_FACTS = """
SELECT t.typtype, n.nspname = 'pg_catalog', t.typcategory = 'A' AND t.typelem <> 0, t.typelem,
       t.typbasetype, t.typtypmod, format_type(t.oid, %(typmod)s), format_type(t.oid, NULL)
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = %(oid)s
"""
_UNLIMITED = ("character varying", "character varying[]", "bit varying", "bit varying[]")
_COLUMN_TYPES = """
SELECT attname, atttypid, atttypmod FROM pg_attribute
WHERE attrelid = %(table)s AND attnum > 0 AND NOT attisdropped
"""


def comparable_type(conn, oid: int, typmod: int) -> str:
    """A type every server has that shows a destination value as the destination type does.

    Built-in types (``pg_catalog``) stay as they are (varchar(n)/varbit(n) without their limit); a domain is compared as its base type (with the
    domain's typmod), an array by its element's comparable type, and every other type the destination
    may have alone (enum, citext or another extension's type, composite, a range over such a type) as
    its text, which is what a text source column carries. The source side casts to this type, so no
    type has to exist on the source, and equal values give equal checksum text on both sides.
    """
    with conn.cursor() as cur:
        cur.execute(_TYPE_FACTS, {"oid": oid, "typmod": typmod})
        typtype, builtin, is_array, elem, base, basemod, name, bare = cur.fetchone()
    if builtin:
        # an explicit cast to varchar(n) / varbit(n) cuts a longer source value silently: compare without
        # the limit, so a value cut on the way shows as a difference (char(n) keeps its: it pads)
        return bare if bare in _UNLIMITED else name
    if is_array:
        return comparable_type(conn, elem, typmod) + "[]"
    if typtype == "d":
        return comparable_type(conn, base, basemod)
    return "text"


def comparable_types(conn, table: TableName) -> dict[str, str]:
    """Column -> :func:`comparable_type` of every destination column."""
    oid = schema.table_oid(conn, table, side="destination")
    out = {}
    with conn.cursor() as cur:
        cur.execute(_COLUMN_TYPES, {"table": oid})
        columns = cur.fetchall()
    for name, typid, typmod in columns:
        out[name] = comparable_type(conn, typid, typmod)
    return out


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


# ----------------------------------------------------------------------------------------------
# running it
# ----------------------------------------------------------------------------------------------
Tally = dict[dt.date, list]  # day -> [count, sum1, sum2, ..., checksum (when enabled)]


def _add(into: Tally, rows) -> None:
    for day, *metrics in rows:
        cur = into.setdefault(day, [0] + [None] * (len(metrics) - 1))
        cur[0] += metrics[0]
        for i, v in enumerate(metrics[1:], start=1):
            if v is not None:
                cur[i] = v if cur[i] is None else cur[i] + v


_TEXT_SETTINGS = (
    # the checksum hashes each row's text: make that text the same on both sides whatever the servers'
    # defaults (SET LOCAL: this read transaction only; rolled back with it). Not TimeZone: both sessions
    # already have the spec's (connections.py), which is also what the chunk path cast timestamptz ->
    # timestamp/date under; UTC here made such a drift column differ on every day of a non-UTC spec
    "SET LOCAL DateStyle = 'ISO, YMD'",
    "SET LOCAL IntervalStyle = 'postgres'",
    "SET LOCAL extra_float_digits = 3",
    "SET LOCAL bytea_output = 'hex'",
)


def _pin_text_settings(conn) -> None:
    with conn.cursor() as cur:
        for statement in _TEXT_SETTINGS:
            cur.execute(statement)


def segments(spec: BackfillSpec, start: pendulum.DateTime, end: pendulum.DateTime, *, whole: bool = False):
    """Month pieces of ``[start, end)`` (``whole``: one piece), split at historical boundaries (one source per
    piece)."""
    from airflow_backfill_provider.core.chunks import Chunk

    pieces = [Chunk("whole range", start, end)] if whole else list(iter_chunks(start, end, _SEGMENT, spec.timezone))
    bounds = [to_datetime(h.until, spec.timezone, what="historical.until") for h in spec.historical]
    return split_at(pieces, bounds) if bounds else pieces


#: below this |pg_stats.correlation| a month's statement reads most of the table: read it once instead
SCATTERED_CORRELATION = 0.5


def _scattered(conn, table: TableName, column: str) -> bool | None:
    """True: the column is not in physical order; False: it is; None: no statistics (or not a column)."""
    from airflow_backfill_provider.plan.sourcestats import correlation

    try:
        c = correlation(conn, table, column)
    except Exception:  # noqa: BLE001 - a hint only: without it validation runs per month, as always
        conn.rollback()
        return None
    return None if c is None else abs(c) < SCATTERED_CORRELATION


def compare(spec: BackfillSpec, src: Tally, dst: Tally) -> list[DayResult]:
    warn, fail = spec.validation.warn_threshold, spec.validation.fail_threshold
    cols = spec.validation.sum_columns
    out = []
    checksum = spec.validation.checksum != "off"
    width = len(cols) + (1 if checksum else 0)
    for day in sorted(set(src) | set(dst)):
        s = src.get(day, [0] + [None] * width)
        d = dst.get(day, [0] + [None] * width)
        sums = {c: (s[i + 1], d[i + 1]) for i, c in enumerate(cols)}
        diffs = {"rows": relative_diff(s[0], d[0])}
        for c in cols:
            diffs[f"sum({c})"] = relative_diff(*sums[c])
        pair = (s[-1], d[-1]) if checksum else None
        res = DayResult(day, s[0], d[0], sums, diffs, checksum=pair)
        res.status = classify(res.worst_diff, warn, fail)  # thresholds: counts and sums
        if checksum:
            diffs["checksum"] = 0.0 if s[-1] == d[-1] else 1.0
            if res.checksum_differs:  # a checksum has no "how much": the spec says what a difference is
                res.status = max(
                    res.status, FAIL if spec.validation.checksum == "fail" else WARN, key=_RANK.__getitem__
                )
        out.append(res)
    return out


def validate_range(
    spec: BackfillSpec,
    start,
    end,
    *,
    source: str | None = None,
    destination: str | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    store: bool = True,
) -> ValidationReport:
    """Compare ``[start, end)`` per local day; store one summary row in the destination; return the report.

    ``source``/``destination`` are Airflow connection ids or DSN URLs (default: the spec's conn ids).
    The source session is read-only with the spec's statement and lock timeouts, and honours
    ``throttle.min_query_interval`` between its statements.
    """
    lo = to_datetime(start, spec.timezone, what="start")
    hi = to_datetime(end, spec.timezone, what="end")
    if utc(hi) <= utc(lo):
        raise PlanError(f"end ({hi.isoformat()}) must be after start ({lo.isoformat()}); the range is [start, end)")
    dag_id = dag_id or spec.effective_dag_id
    appname = f"backfill:{dag_id}:validate"
    target = spec.destination
    notes: list[str] = []
    src_conn = dst_conn = None
    try:
        src_conn = open_source(spec, appname, source)
        dst_conn = open_destination(spec, appname, destination, bound_idle=False)
        # one statement per side over the whole range when months would each read most of the table
        src_whole = bool(not spec.historical and _scattered(src_conn, spec.source, spec.time_column))
        dst_whole = _scattered(dst_conn, target, spec.time_column)
        dst_whole = src_whole if dst_whole is None else dst_whole
        src_slices = block_slices(src_conn, spec.source) if src_whole else None
        dst_slices = block_slices(dst_conn, target) if dst_whole else None
        for side, table, whole, slices, conn in (
            ("source", spec.source, src_whole, src_slices, src_conn),
            ("destination", target, dst_whole, dst_slices, dst_conn),
        ):
            if whole:
                how = f"{len(slices)} slices of its blocks in one snapshot" if slices else "one statement"
                _note(notes, f"{side} {table}: {spec.time_column} is not in physical order: read whole, in {how}")
            conn.rollback()  # the catalog reads above: the read below starts its own transaction
            if slices:  # one snapshot for all slices: a row an update moves to another block is counted once
                conn.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ
        for conn in (src_conn, dst_conn):
            _pin_text_settings(conn)
        dest_cols = schema.table_columns(dst_conn, target, side="destination")
        comparable = comparable_types(dst_conn, target)
        typed = checksum_method(src_conn, dst_conn) == "typed"
        src_cols_cache: dict[TableName, list[schema.Column]] = {}
        loaded = _loaded_columns(spec, dest_cols, src_conn, src_cols_cache)
        dst_side = replace(
            destination_query(spec, target, dest_cols, dst_conn, comparable, loaded=loaded), typed_hash=typed
        )
        src_tally: Tally = {}
        dst_tally: Tally = {}
        pause = spec.throttle.min_query_interval

        def params(seg) -> dict:
            return {"lo": utc(seg.start), "hi": utc(seg.end), "tz": spec.timezone}

        def run_destination() -> None:
            for seg in segments(spec, lo, hi, whole=dst_whole):
                for blocks in _block_ranges(dst_slices):
                    rows = _read(
                        dst_conn,
                        per_day_sql(dst_side, blocks),
                        params(seg),
                        side="destination",
                        table=target,
                        timeout_s=spec.statement_timeout_s,
                    )
                    _add(dst_tally, rows)

        # the destination's statements run in a thread on their own session while the source's run here
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="validate-destination") as pool:
            dst_done = pool.submit(run_destination)
            try:
                for i, seg in enumerate(segments(spec, lo, hi, whole=src_whole)):
                    table, expressions = source_for(spec, seg)  # the transfer's own choice of table/expressions
                    if table not in src_cols_cache:
                        src_cols_cache[table] = schema.table_columns(src_conn, table, side="source")
                    src_side = replace(
                        source_query(
                            spec,
                            dest_cols,
                            src_cols_cache[table],
                            table,
                            expressions,
                            notes,
                            src_conn,
                            comparable,
                            loaded=loaded,
                        ),
                        typed_hash=typed,
                    )
                    for j, blocks in enumerate(_block_ranges(src_slices)):
                        if (i or j) and pause:
                            time.sleep(pause)  # pacing: the same lever the chunks use
                        rows = _read(
                            src_conn,
                            per_day_sql(src_side, blocks),
                            params(seg),
                            side="source",
                            table=table,
                            timeout_s=spec.statement_timeout_s,
                        )
                        _add(src_tally, rows)
            except BaseException:
                dst_conn.cancel()  # do not wait for the destination's statements to fail the same way
                raise
            finally:
                wait([dst_done])
            dst_done.result()
        src_conn.rollback()
        dst_conn.rollback()
        report = ValidationReport(
            table=str(target),
            timezone=spec.timezone,
            range_start=lo,
            range_end=hi,
            warn_threshold=spec.validation.warn_threshold,
            fail_threshold=spec.validation.fail_threshold,
            sum_columns=list(spec.validation.sum_columns),
            days=compare(spec, src_tally, dst_tally),
            notes=notes,
        )
        if store:
            store_summary(dst_conn, TableName.parse(spec.validation.report_table), report, dag_id=dag_id, run_id=run_id)
        return report
    finally:
        close_all(src_conn, dst_conn)


# ----------------------------------------------------------------------------------------------
# the summary row (one per validation run, for dashboards)
# ----------------------------------------------------------------------------------------------
_REPORT_COLUMNS = sql.SQL(
    """    id               bigserial   PRIMARY KEY,
    validated_at     timestamptz NOT NULL DEFAULT now(),
    dag_id           text,
    run_id           text,
    target_table     text        NOT NULL,
    range_start      timestamptz NOT NULL,
    range_end        timestamptz NOT NULL,
    timezone         text        NOT NULL,
    days             integer     NOT NULL,
    days_warn        integer     NOT NULL,
    days_fail        integer     NOT NULL,
    source_rows      bigint      NOT NULL,
    destination_rows bigint      NOT NULL,
    worst_day        date,
    worst_metric     text,
    worst_diff       double precision NOT NULL,
    status           text        NOT NULL,
    totals           jsonb       NOT NULL"""
)


def ensure_report_table(conn, table: TableName) -> None:
    ddl.ensure_table(conn, table, _REPORT_COLUMNS)


def store_summary(conn, table: TableName, report: ValidationReport, *, dag_id: str | None, run_id: str | None) -> None:
    ensure_report_table(conn, table)
    t = report.totals()
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                """INSERT INTO {t} (dag_id, run_id, target_table, range_start, range_end, timezone, days,
                       days_warn, days_fail, source_rows, destination_rows, worst_day, worst_metric,
                       worst_diff, status, totals)
                   VALUES (%(dag_id)s, %(run_id)s, %(table)s, %(range_start)s, %(range_end)s, %(timezone)s,
                       %(days)s, %(days_warn)s, %(days_fail)s, %(source_rows)s, %(destination_rows)s,
                       %(worst_day)s, %(worst_metric)s, %(worst_diff)s, %(status)s, %(totals)s)"""
            ).format(t=sql.Identifier(*table.parts)),
            {
                **t,
                "dag_id": dag_id,
                "run_id": run_id,
                "range_start": report.range_start,
                "range_end": report.range_end,
                # the row keeps what the XCom leaves out: how the source was read, and every non-passing day
                "totals": json.dumps(
                    {
                        **t,
                        # what the days were judged by: the page words their reasons against these (progress.day_reason)
                        "thresholds": {"warn": report.warn_threshold, "fail": report.fail_threshold},
                        "schema_decisions": report.notes,
                        "days_not_passing": [
                            {
                                "day": d.day.isoformat(),
                                "status": d.status,
                                "source_rows": d.source_rows,
                                "destination_rows": d.destination_rows,
                                "diffs": {m: _finite_or_text(x) for m, x in d.diffs.items()},
                            }
                            for d in report.ranked()
                            if d.status != PASS
                        ][:1000],
                    }
                ),
            },
        )
    conn.commit()
