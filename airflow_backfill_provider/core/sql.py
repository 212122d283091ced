"""Every SQL text the provider runs, built with ``psycopg2.sql``.

Names (tables, columns) only ever enter SQL as ``sql.Identifier``; values as bound parameters or
``sql.Literal``. The only raw ``sql.SQL`` fragments are constants written here, type names read
from the destination's own catalog (``format_type``), and historical column expressions written
by the spec author (documented as trusted SQL; never from DAG params).
"""

from __future__ import annotations

import datetime
from typing import Sequence

from psycopg2 import sql

from airflow_backfill_provider.core.spec import TableName


def ident(table: TableName) -> sql.Identifier:
    return sql.Identifier(*table.parts)


def cols(names: Sequence[str], prefix: str | None = None) -> sql.Composed:
    if prefix:
        return sql.SQL(", ").join(sql.Identifier(prefix, n) for n in names)
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def chunk_select(
    source: TableName, select_exprs: Sequence[sql.Composable], time_column: str | sql.Composable, start, end
) -> sql.Composed:
    """``SELECT <exprs> FROM source WHERE t >= start AND t < end``: half-open, values as literals.

    ``time_column`` is a column name, or (historical mode) the spec author's expression for it.
    ``start``/``end`` are :func:`timebounds.bounds` values of the column's own type (date, naive wall
    time, UTC instant); never a chunk's local datetimes, which would compare in the session TimeZone.
    Literals, not parameters: COPY cannot take bind parameters. ``sql.Literal`` quotes datetimes safely.
    """
    for b in (start, end):
        if isinstance(b, datetime.datetime) and b.utcoffset() not in (None, datetime.timedelta(0)):
            raise ValueError(f"chunk bound {b.isoformat()} is local time: pass timebounds.bounds(...) values")
    return sql.SQL("SELECT {exprs} FROM {src} WHERE {t} >= {lo} AND {t} < {hi}").format(
        exprs=sql.SQL(", ").join(select_exprs),
        src=ident(source),
        t=sql.Identifier(time_column) if isinstance(time_column, str) else time_column,
        lo=sql.Literal(start),
        hi=sql.Literal(end),
    )


def copy_out(select: sql.Composable, fmt: str) -> sql.Composed:
    return sql.SQL("COPY ({select}) TO STDOUT WITH (FORMAT {fmt})").format(select=select, fmt=_fmt(fmt))


def copy_in(table: TableName | str, columns: Sequence[str], fmt: str) -> sql.Composed:
    target = sql.Identifier(table) if isinstance(table, str) else ident(table)
    return sql.SQL("COPY {t} ({c}) FROM STDIN WITH (FORMAT {fmt})").format(t=target, c=cols(columns), fmt=_fmt(fmt))


def _fmt(fmt: str) -> sql.SQL:
    if fmt not in ("binary", "text"):
        raise ValueError(f"copy_format={fmt!r} is not valid; choose 'binary' or 'text'")
    return sql.SQL(fmt)  # constant from a closed set


def create_staging(
    stage: str,
    destination: TableName,
    columns: Sequence[str],
    stage_types: Sequence[str | None] | None = None,
    *,
    keep: bool = False,
) -> sql.Composed:
    """A temp table with exactly the destination's column types, dropped at commit (or rollback); with
    ``keep``: kept for the session and emptied at each commit (a batch's chunks).

    ``stage_types[i]`` (from the catalogs, see prepare/casts.py): another type for column i, the one the source
    sends, when the cast to the destination type runs in the destination.
    """
    if stage_types and any(stage_types):
        select = sql.SQL(", ").join(
            sql.Identifier(c) if t is None else sql.SQL("NULL::{t} AS {c}").format(t=sql.SQL(t), c=sql.Identifier(c))
            for c, t in zip(columns, stage_types)
        )
    else:
        select = cols(columns)
    on_commit = sql.SQL("DELETE ROWS" if keep else "DROP")  # constant from a closed set
    return sql.SQL("CREATE TEMP TABLE {stage} ON COMMIT {oc} AS SELECT {c} FROM {dest} WITH NO DATA").format(
        stage=sql.Identifier(stage), oc=on_commit, c=select, dest=ident(destination)
    )


def upsert(
    destination: TableName,
    stage: str,
    columns: Sequence[str],
    keys: Sequence[str],
    version_column: str | None,
    conflict_policy: str,
    insert_exprs: Sequence[sql.Composable] | None = None,
    changed: sql.Composable | None = None,
    identity_always: Sequence[str] = (),
) -> sql.Composed:
    """Stage -> destination, newer wins, and an unchanged row is never rewritten (no dead tuples on rerun).

    ``insert_exprs``: per column, what is selected from the stage (a cast run in the destination).
    ``changed``: "a non-key column differs" compared exactly per type (casts.changed_predicate); without
    it, the row comparison ``(t.*) IS DISTINCT FROM (EXCLUDED.*)``, which needs ``=`` on every type.

    Rows the WHERE filters out are "unchanged" (or older). Inserted vs updated counts come from
    :func:`xact_write_counts` around it, not from ``RETURNING``: returning every inserted row into a CTE
    to count it cost ~7% of the statement's CPU on a first load (benchmarks/README.md).
    """
    non_keys = [c for c in columns if c not in keys]
    # GENERATED ALWAYS AS IDENTITY columns written from the source: INSERT needs OVERRIDING SYSTEM VALUE
    # (COPY needs nothing) and an UPDATE may only set them to DEFAULT, so they are never in the SET list
    overriding = sql.SQL(" OVERRIDING SYSTEM VALUE") if any(c in identity_always for c in columns) else sql.SQL("")
    set_cols = [c for c in non_keys if c not in identity_always]
    target = sql.Identifier("t")
    if changed is None:
        changed = sql.SQL("({tcols}) IS DISTINCT FROM ({ecols})").format(
            tcols=cols(non_keys, "t"), ecols=cols(non_keys, "excluded")
        )
    if version_column:
        v = sql.Identifier(version_column)
        # newer wins; equal version rewrites only if something differs; NULL in the table loses to a value
        where = sql.SQL(
            "EXCLUDED.{v} > t.{v} OR (t.{v} IS NULL AND EXCLUDED.{v} IS NOT NULL)"
            " OR (EXCLUDED.{v} IS NOT DISTINCT FROM t.{v} AND {changed})"
        ).format(v=v, changed=changed)
        action = _do_update(set_cols, where)
    elif conflict_policy == "backfill_wins":
        action = _do_update(set_cols, changed)
    else:  # live_wins: a row already there (e.g. written by live ingest) is never touched
        action = sql.SQL("DO NOTHING")
    if not set_cols:
        action = sql.SQL("DO NOTHING")
    select = sql.SQL(", ").join(insert_exprs) if insert_exprs else cols(columns)
    return sql.SQL("INSERT INTO {dest} AS {t} ({c}){o} SELECT {s} FROM {stage} ON CONFLICT ({k}) {action}").format(
        dest=ident(destination),
        t=target,
        o=overriding,
        c=cols(columns),
        s=select,
        stage=sql.Identifier(stage),
        k=cols(keys),
        action=action,
    )


def xact_write_counts() -> sql.SQL:
    """(inserted, updated) rows written so far by this transaction into a table (``%(table)s``, a quoted
    name for ``to_regclass``) and, if it is partitioned, its partitions: PostgreSQL's own per-transaction
    counters, free to read; they also hold the session's earlier transactions until its statistics are
    flushed, so only a difference of two reads counts this transaction. ``pg_partition_tree`` lists nothing for a plain table, hence the UNION."""
    return sql.SQL(
        "SELECT coalesce(sum(pg_stat_get_xact_tuples_inserted(r)), 0)::bigint,"
        " coalesce(sum(pg_stat_get_xact_tuples_updated(r)), 0)::bigint"
        " FROM (SELECT to_regclass(%(table)s) AS r"
        " UNION SELECT relid FROM pg_partition_tree(to_regclass(%(table)s))) AS rels"
    )


def _do_update(non_keys: Sequence[str], where: sql.Composable) -> sql.Composed:
    sets = sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in non_keys)
    return sql.SQL("DO UPDATE SET {sets} WHERE {where}").format(sets=sets, where=where)


def advisory_xact_lock() -> sql.SQL:
    """Serialize two runs of the same chunk on the destination; released at commit/rollback."""
    return sql.SQL("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))")


def advisory_xact_lock_of(key: str) -> sql.Composed:
    """:func:`advisory_xact_lock` with its key as a literal: sent in one round trip with the next statement."""
    return sql.SQL("SELECT pg_advisory_xact_lock(hashtextextended({}, 0))").format(sql.Literal(key))


def incremental_select(
    source: TableName,
    select_exprs: Sequence[sql.Composable],
    cursor_column: str,
    lower,
    *,
    time_column: str | None = None,
    time_lower=None,
) -> sql.Composed:
    """Live ingest: ``SELECT <exprs> FROM source WHERE cursor > lower`` (open lower bound, no upper bound).

    With ``time_column``: ``... OR time_column >= time_lower`` too, so a row at or after the backfill's
    clip is read even when its cursor is NULL or older than its time column (see live.py).
    A literal, not a parameter, for the same reason as :func:`chunk_select` (COPY takes no parameters).
    """
    where = sql.SQL("{c} > {lo}").format(c=sql.Identifier(cursor_column), lo=sql.Literal(lower))
    if time_column is not None:
        where = sql.SQL("({w} OR {t} >= {tlo})").format(
            w=where, t=sql.Identifier(time_column), tlo=sql.Literal(time_lower)
        )
    return sql.SQL("SELECT {exprs} FROM {src} WHERE {w}").format(
        exprs=sql.SQL(", ").join(select_exprs), src=ident(source), w=where
    )


def max_of(stage: str, column: str, kind: str = "timestamptz", tz: str = "UTC") -> sql.Composed:
    """The highest cursor value staged by a live run, as timestamptz (the watermark's type); a naive or
    date cursor (``kind``) is read in the spec's timezone ``tz`` (timebounds.instant_sql)."""
    from airflow_backfill_provider.core.timebounds import instant_sql

    top = instant_sql(kind, sql.SQL("max({c})").format(c=sql.Identifier(column)), tz)
    return sql.SQL("SELECT {top} FROM {stage}").format(top=top, stage=sql.Identifier(stage))


def create_like(parallel: TableName, live: TableName) -> sql.Composed:
    """Pattern B's parallel table: same columns, defaults, constraints and indexes as the live table.

    ``INCLUDING ALL`` copies the unique key the upsert needs; triggers and foreign keys are not copied,
    so live-table side effects do not fire on backfill rows until the merge.
    """
    return sql.SQL("CREATE TABLE IF NOT EXISTS {p} (LIKE {t} INCLUDING ALL)").format(p=ident(parallel), t=ident(live))


def merge_insert(live: TableName, parallel: TableName, columns: Sequence[str], keys: Sequence[str]) -> sql.Composed:
    """Pattern B's final merge: rows of the parallel table whose key the live table lacks; live rows untouched."""
    return sql.SQL(
        "WITH ins AS (INSERT INTO {t} ({c}) SELECT {c} FROM {p} ON CONFLICT ({k}) DO NOTHING RETURNING 1)"
        " SELECT count(*) FROM ins"
    ).format(t=ident(live), c=cols(columns), p=ident(parallel), k=cols(keys))


def drop_table(table: TableName) -> sql.Composed:
    return sql.SQL("DROP TABLE {t}").format(t=ident(table))


def count_rows(table: TableName) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {t}").format(t=ident(table))
