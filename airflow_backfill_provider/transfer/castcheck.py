"""After a chunk failed with a data error (SQLSTATE class 22, or 0A000 such as NaN -> integer): which
column, which row, which value. Also the rounding check that runs before a chunk's upsert.

A failed COPY only says e.g. ``invalid input syntax for type numeric: "12,50"``, without the column
or the row, and nothing of the chunk is loaded (one destination transaction). This check re-reads
the chunk on the (read-only) source in one PL/pgSQL ``DO`` block that casts every column of every
row the way the transfer does, and stops at the first value that does not fit. It runs only on the
failure path, so the normal path pays nothing for it.

The block is one statement (one scan of the chunk, one subtransaction), it writes nothing, and it
is built with ``psycopg2.sql`` like every other statement: names as identifiers, bounds as literals,
type names from the destination's catalog, and historical expressions from the spec author.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from psycopg2 import sql

from airflow_backfill_provider.core import sql as q
from airflow_backfill_provider.prepare.drift import ColumnPlan
from airflow_backfill_provider.core.spec import TableName

_MARK = "backfill cast check"  # MESSAGE of the exception the block raises with its finding


@dataclass(frozen=True)
class CastFailure:
    column: str | None  # None: a historical expression failed while the row was being read
    source_expr: str | None
    type_sql: str | None
    value: str | None
    key: str | None  # ROW(key columns) of the offending row; for an expression error, the last good row
    error: str
    sqlstate: str

    def describe(self, chunk_id: str, key_columns: list[str]) -> str:
        keys = ", ".join(key_columns)
        if self.column is None:
            # rows come in scan order; the failing row itself cannot be read, its predecessor can
            where = f"the row after key ({keys})={self.key} (scan order)" if self.key else "the first row read"
            return (
                f"chunk {chunk_id}: a historical column expression failed at {where}: {self.error} "
                f"(SQLSTATE {self.sqlstate}). Nothing was loaded for this chunk; fix the expression in "
                "historical.column_expressions (e.g. guard it with NULLIF/CASE)"
            )
        value = "NULL" if self.value is None else repr(self.value)
        return (
            f"chunk {chunk_id}: column {self.column!r} cannot take value {value} "
            f"(source {self.source_expr} -> {self.type_sql}) at key ({keys})={self.key}: {self.error} "
            f"(SQLSTATE {self.sqlstate}). Nothing was loaded for this chunk; fix the value in the source, "
            f"or map it with a historical.column_expressions entry for {self.column!r}"
        )


def check_block(conn, src_table: TableName, plan: ColumnPlan, key_columns: list[str], start, end) -> sql.Composed:
    """``DO '<plpgsql>'``: cast each column of each row of the chunk, raise at the first bad value.

    ``start``/``end``: the chunk's :func:`timebounds.bounds` (the same rows the chunk's COPY read)."""
    # columns cast on the source (a type only the destination has is cast there, see prepare/casts.py)
    checked = [i for i, raw in enumerate(plan.raw_exprs) if raw is not None and plan.check_types[i] is not None]
    key_raws = [plan.raw_exprs[plan.columns.index(k)] for k in key_columns]
    select_list = [sql.SQL("ROW({k})::text AS _key").format(k=sql.SQL(", ").join(key_raws))]
    select_list += [sql.SQL("{r} AS {a}").format(r=plan.raw_exprs[i], a=sql.Identifier(f"c{i}")) for i in checked]
    rows = q.chunk_select(src_table, select_list, plan.time_filter, start, end)
    # a variable of the exact destination type: assigning to it enforces typmods (length, precision)
    return _block(conn, plan, rows, [(i, *ct) for i in checked if (ct := plan.check_types[i]) is not None])


def _block(conn, plan: ColumnPlan, rows: sql.Composable, items, extra_conditions: str = "") -> sql.Composed:
    """The DO block: for each row of ``rows`` (``_key`` and ``c<i>`` columns), assign ``c<i>`` cast to
    ``cast`` to a variable of type ``declare``, for each ``(i, declare, cast)`` of ``items``."""
    declares = [sql.SQL("{v} {t};").format(v=sql.Identifier(f"bf_v{i}"), t=sql.SQL(declare)) for i, declare, _ in items]
    steps = [
        sql.SQL("bf_col := {name}; bf_val := bf_row.{c}::text; {v} := bf_row.{c}::{cast};").format(
            name=sql.Literal(plan.columns[i]),
            c=sql.Identifier(f"c{i}"),
            v=sql.Identifier(f"bf_v{i}"),
            cast=sql.SQL(cast),  # the same cast the transfer applies
        )
        for i, _, cast in items
    ]
    # OPEN/FETCH, not FOR: a FOR loop prefetches rows, so an expression failing in row n would surface
    # before the loop has seen rows n-10..n-1; FETCH evaluates exactly one row at a time.
    # use_column: in the chunk's SELECT a name is the table's column, never one of these variables
    # (a source column named like one made the block fail, and the diagnosis was lost)
    body = sql.SQL(
        "#variable_conflict use_column\n"
        "DECLARE bf_cur refcursor; bf_row record; bf_key text; bf_col text; bf_val text; {declares}\n"
        "BEGIN\n"
        "  OPEN bf_cur NO SCROLL FOR {rows};\n"
        "  LOOP\n"
        "    FETCH bf_cur INTO bf_row;\n"  # a failure here is a historical expression's (key: the previous row)
        "    EXIT WHEN NOT FOUND;\n"
        "    bf_key := bf_row._key; {steps}\n"
        "    bf_col := NULL; bf_val := NULL;\n"
        "  END LOOP;\n"
        "EXCEPTION WHEN data_exception OR feature_not_supported{extra} THEN\n"  # 0A000: e.g. NaN -> integer
        "  RAISE EXCEPTION USING MESSAGE = {mark}, DETAIL = json_build_object(\n"
        "    'column', bf_col, 'value', bf_val, 'key', bf_key, 'error', SQLERRM, 'sqlstate', SQLSTATE)::text;\n"
        "END"
    ).format(
        declares=sql.SQL(" ").join(declares),
        rows=rows,
        steps=sql.SQL(" ").join(steps),
        extra=sql.SQL(extra_conditions),  # constant condition names from this module
        mark=sql.Literal(_MARK),
    )
    return sql.SQL("DO {}").format(sql.Literal(body.as_string(conn)))


def _finding(err, plan: ColumnPlan, source_expr) -> CastFailure | None:
    """The block's finding from its error, or None if the error is not the block's own."""
    if err.diag.message_primary != _MARK or not err.diag.message_detail:
        return None
    found = json.loads(err.diag.message_detail)
    col = found.get("column")
    idx = plan.columns.index(col) if col in plan.columns else None
    return CastFailure(
        column=col,
        source_expr=source_expr(idx) if idx is not None else None,
        type_sql=plan.types[idx] if idx is not None else None,
        value=found.get("value"),
        key=found.get("key"),
        error=found.get("error") or "",
        sqlstate=found.get("sqlstate") or "22000",
    )


def find_cast_failure(
    conn, src_table: TableName, plan: ColumnPlan, key_columns: list[str], start, end
) -> CastFailure | None:
    """Run the check on a fresh read-only source connection; None if every value fits (then the
    failure was elsewhere, and the caller keeps the original error)."""
    import psycopg2

    block = check_block(conn, src_table, plan, key_columns, start, end)
    try:
        with conn.cursor() as cur:
            cur.execute(block)
    except psycopg2.Error as err:
        conn.rollback()
        return _finding(err, plan, lambda i: (plan.raw_exprs[i] or sql.SQL("NULL")).as_string(conn))
    conn.rollback()
    return None


def casts_in_destination(plan: ColumnPlan) -> list[int]:
    """Columns whose cast runs in the destination's upsert (types only the destination has, rounding casts)."""
    return [i for i, t in enumerate(plan.stage_types) if t is not None]


SAVEPOINT = "backfill_upsert"


def find_failure_in_stage(cur, plan: ColumnPlan, stage: str, key_columns: list[str], err) -> CastFailure | None:
    """After the upsert failed on a value (class 22, 0A000, or a domain's CHECK, 23514) with casts that
    run in the destination: roll back to the savepoint taken before the upsert and cast each such
    column of each staged row, as the upsert does, to name the column, key and value. None if the
    error was something else, or no staged value fails (then the caller keeps the original error)."""
    import psycopg2

    code = str(getattr(err, "pgcode", "") or "")
    items = casts_in_destination(plan)
    if not items or not (code.startswith("22") or code in ("0A000", "23514")):
        return None
    try:
        cur.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(sql.Identifier(SAVEPOINT)))
    except psycopg2.Error:  # diagnosis is best effort: the caller raises the original error
        return None
    key = sql.SQL("ROW({k})::text AS _key").format(k=q.cols(key_columns))
    rows = sql.SQL("SELECT {cols} FROM {stage}").format(
        cols=sql.SQL(", ").join(
            [
                key,
                *[
                    sql.SQL("{c} AS {a}").format(c=sql.Identifier(plan.columns[i]), a=sql.Identifier(f"c{i}"))
                    for i in items
                ],
            ]
        ),
        stage=sql.Identifier(stage),
    )
    # the destination column's own type: assignment applies its length and its domain's constraints
    block = _block(
        cur.connection, plan, rows, [(i, plan.types[i], plan.dest_casts[i]) for i in items], " OR check_violation"
    )
    try:
        cur.execute(block)
    except psycopg2.Error as found_err:
        return _finding(found_err, plan, lambda i: f"{plan.columns[i]} staged as {plan.stage_types[i]}")
    return None


def upsert_naming_bad_values(cur, plan: ColumnPlan, stage: str, key_columns: list[str], chunk_id: str, upsert):
    """Run ``upsert()`` (the staging -> destination statement); if a cast that runs in the destination
    rejects a value, raise PermanentChunkError naming column, key and value instead of the bare error."""
    import psycopg2

    from airflow_backfill_provider.core.exceptions import PermanentChunkError

    in_destination = casts_in_destination(plan)
    if in_destination:
        cur.execute(sql.SQL("SAVEPOINT {}").format(sql.Identifier(SAVEPOINT)))
    try:
        return upsert()
    except psycopg2.Error as err:
        found = find_failure_in_stage(cur, plan, stage, key_columns, err) if in_destination else None
        if found is not None:
            raise PermanentChunkError(found.describe(chunk_id, key_columns)) from err
        raise


def check_rounding(cur, plan: ColumnPlan, stage: str, key_columns: list[str], what: str) -> None:
    """Before the upsert: fail if a cast that may round (``plan.lossy``) would change a staged value.

    One scan of the (temporary) staging table, only for plans with such a cast. Raises
    PermanentChunkError naming the column, both types, the key, the value before and after, and
    the fixes; the caller rolls back, so nothing of the chunk is written.
    """
    if not plan.lossy:
        return
    from airflow_backfill_provider.core.exceptions import PermanentChunkError

    key = sql.SQL("ROW({k})::text").format(k=q.cols(key_columns))
    outputs = [key]
    for lc in plan.lossy:
        outputs += [
            lc.changes,
            sql.SQL("{c}::text").format(c=sql.Identifier(lc.column)),
            sql.SQL("{a}::text").format(a=lc.after),
        ]
    cur.execute(
        sql.SQL("SELECT {out} FROM {stage} WHERE {any} LIMIT 1").format(
            out=sql.SQL(", ").join(outputs),
            stage=sql.Identifier(stage),
            any=sql.SQL(" OR ").join(sql.SQL("({p})").format(p=lc.changes) for lc in plan.lossy),
        )
    )
    row = cur.fetchone()
    if row is None:
        return
    for n, lc in enumerate(plan.lossy):
        changed, before, after = row[1 + 3 * n : 4 + 3 * n]
        if changed:
            raise PermanentChunkError(
                f"{what}: column {lc.column!r}: casting source type {lc.source_type} to destination type "
                f"{lc.type_sql} would change value {before!r} to {after!r} at key ({', '.join(key_columns)})="
                f"{row[0]}. Nothing was loaded for this chunk; widen the destination column, map the value "
                f"explicitly with a historical.column_expressions entry (e.g. round(...)), or accept the "
                f"rounding with allow_lossy_casts: [{lc.column}] in the spec"
            )
