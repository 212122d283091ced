"""Read table shapes from the catalogs and decide what each chunk selects.

The destination schema is the truth (current-schema mode): every destination column is filled;
one missing from the source is selected as ``NULL::<type>``; source-only columns are ignored;
everything is cast to the destination type in the source query, so binary COPY lines up exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg2 import sql

from airflow_backfill_provider import casts
from airflow_backfill_provider.exceptions import PermanentChunkError
from airflow_backfill_provider.spec import BackfillSpec, TableName


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str  # format_type() output from the catalog, e.g. 'numeric(12,2)'
    not_null: bool = False


@dataclass(frozen=True)
class LossyCast:
    """A cast that may round (numeric scale, float precision, fractions, time precision, timestamp -> date)."""

    column: str
    source_type: str
    type_sql: str
    changes: sql.Composable  # over the staging table: true where the cast changes the value
    after: sql.Composable  # the value after the cast


@dataclass
class ColumnPlan:
    """What one chunk selects from the source, per destination column, and why.

    ``raw_exprs[i]`` is what is read from the source for ``columns[i]`` before the cast (None for a
    column loaded as NULL) and ``types[i]`` its destination type; the cast-failure check uses both.
    ``time_filter`` is what the chunk's ``[start, end)`` is compared with on the source.
    """

    columns: list[str]
    select_exprs: list[sql.Composable]
    decisions: list[str] = field(default_factory=list)
    raw_exprs: list[sql.Composable | None] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    time_filter: sql.Composable | None = None
    #: the source's catalog type of a plain time column (None for a historical expression)
    time_source_type: str | None = None
    #: date / timestamp / timestamptz of ``time_filter`` on the source, set by source.prepare (timebounds.py)
    time_kind: str | None = None
    # how values travel (casts.py); filled when both catalogs' type facts were given to plan_columns
    copy_exprs: list[sql.Composable] = field(default_factory=list)  # what the source COPY selects
    stage_types: list[str | None] = field(default_factory=list)  # staging column type; None: the destination's
    insert_exprs: list[sql.Composable] = field(default_factory=list)  # staging -> destination (cast if needed)
    dest_casts: list[str | None] = field(default_factory=list)  # the type cast to in the destination, if any
    # castcheck on the source: (variable type, cast type) per column; None: not cast on the source
    check_types: list[tuple[str, str] | None] = field(default_factory=list)
    lossy: list[LossyCast] = field(default_factory=list)  # casts to verify value by value on the staging table
    changed: sql.Composable | None = None  # "a non-key column differs", exact per type (upsert predicate)

    def expr_for(self, column: str) -> sql.Composable:
        """The select expression (cast to the destination type) of one destination column."""
        return self.select_exprs[self.columns.index(column)]


_FIND_TABLE = """
SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %(name)s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND (n.nspname = %(schema)s OR (%(schema)s IS NULL AND n.nspname = ANY (current_schemas(false))))
ORDER BY array_position(current_schemas(false), n.nspname) NULLS LAST
LIMIT 1
"""

# the table, its columns and its unique keys in one statement (constant SQL; the names are bound parameters)
_DESCRIBE = (
    "WITH t AS ("
    + _FIND_TABLE
    + """)
SELECT t.oid,
       (SELECT json_agg(json_build_array(a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull)
                        ORDER BY a.attnum)
          FROM pg_attribute a
         WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''),
       (SELECT json_agg(json_build_array(
                 ic.relname, con.conname,
                 -- key attributes only: INCLUDE columns (after indnkeyatts) are not part of the key
                 (SELECT coalesce(array_agg(a.attname ORDER BY a.attname), '{}')
                    FROM pg_attribute a
                   WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey[0:i.indnkeyatts - 1])),
                 i.indpred IS NOT NULL, i.indexprs IS NOT NULL, NOT i.indimmediate, i.indisvalid,
                 -- pg_index.indnullsnotdistinct exists from PostgreSQL 15 on; read it without naming it
                 coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false)))
          FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
          LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                                      AND con.contype IN ('p', 'u')
         WHERE i.indrelid = t.oid AND i.indisunique)
FROM t
"""
)


@dataclass(frozen=True)
class UniqueKey:
    """A unique index of the destination, as ON CONFLICT inference sees it."""

    index: str
    constraint: str | None  # the PRIMARY KEY / UNIQUE constraint backed by it, if any
    columns: tuple[str, ...]  # key attributes, sorted (never INCLUDE columns)
    partial: bool  # has a WHERE: ON CONFLICT (cols) without that WHERE cannot use it
    expression: bool  # on an expression: ON CONFLICT (cols) cannot use it
    deferrable: bool  # ON CONFLICT refuses deferrable arbiters
    valid: bool  # an invalid index (failed CREATE INDEX CONCURRENTLY) is never an arbiter
    nulls_not_distinct: bool  # PostgreSQL 15+: NULLs conflict like values

    @property
    def label(self) -> str:
        return f"constraint {self.constraint!r}" if self.constraint else f"unique index {self.index!r}"


def _missing_table(conn, table: TableName, side: str) -> PermanentChunkError:
    where = f"schema {table.schema_!r}" if table.schema_ else "the search_path"
    return PermanentChunkError(
        f"{side} table {str(table)!r} does not exist in {where} of database "
        f"{conn.get_dsn_parameters().get('dbname')!r}; check {side}_table in the spec"
    )


def describe_table(conn, table: TableName, *, side: str) -> tuple[list[Column], list[UniqueKey]]:
    """A table's columns and unique indexes in ONE round trip (every chunk runs this on a fresh session)."""
    with conn.cursor() as cur:
        cur.execute(_DESCRIBE, {"name": table.name, "schema": table.schema_})
        row = cur.fetchone()
    if row is None:
        raise _missing_table(conn, table, side)
    _, columns, keys = row
    return [Column(*c) for c in columns or []], [
        UniqueKey(k[0], k[1], tuple(k[2]), *k[3:]) for k in sorted(keys or [], key=lambda k: k[0])
    ]


def describe_types(conn, table: TableName) -> dict[str, casts.TypeInfo]:
    """Per-column type facts (domains resolved, arrays, collation, send function) in one round trip."""
    with conn.cursor() as cur:
        cur.execute(casts.TYPES_SQL.replace("{find}", _FIND_TABLE), {"name": table.name, "schema": table.schema_})
        return casts.type_infos(cur.fetchall())


def table_oid(conn, table: TableName, *, side: str) -> int:
    with conn.cursor() as cur:
        cur.execute(_FIND_TABLE, {"name": table.name, "schema": table.schema_})
        row = cur.fetchone()
    if row is None:
        raise _missing_table(conn, table, side)
    return row[0]


def table_columns(conn, table: TableName, *, side: str) -> list[Column]:
    return describe_table(conn, table, side=side)[0]


def check_destination(spec: BackfillSpec, dest_cols: list[Column], keys: list[UniqueKey], table: TableName) -> None:
    """Fail before any write if the destination cannot take a newer-wins upsert on the key columns."""
    names = {c.name for c in dest_cols}
    needed = [*spec.key_columns, spec.time_column, *([spec.version_column] if spec.version_column else [])]
    needed += [c for c in spec.columns or [] if c not in needed]
    missing = [c for c in needed if c not in names]
    if missing:
        raise PermanentChunkError(
            f"destination table {str(table)!r} has no column(s) {missing}; its columns are {sorted(names)}"
        )
    check_unique_key(spec, dest_cols, keys, table)


def check_unique_key(spec: BackfillSpec, dest_cols: list[Column], keys: list[UniqueKey], table: TableName) -> None:
    """The upsert's ``ON CONFLICT (key_columns)`` must find an arbiter that makes reruns idempotent.

    Refused before any write: no full, valid unique index on exactly the key columns (partial and
    expression indexes are not inferred); a deferrable one (PostgreSQL refuses it as an arbiter); and
    nullable key columns without NULLS NOT DISTINCT (a NULL key never conflicts: every rerun duplicates).
    """
    wanted = tuple(sorted(spec.key_columns))
    cols = ", ".join(spec.key_columns)
    same = [k for k in keys if k.columns == wanted and not k.expression]
    arbiters = [k for k in same if k.valid and not k.partial]
    if not arbiters:
        why = [f"{k.label} is partial (WHERE ...): ON CONFLICT cannot infer it" for k in same if k.partial]
        why += [f"{k.label} is invalid (a failed CREATE INDEX CONCURRENTLY?): REINDEX it" for k in same if not k.valid]
        why += [f"{k.label} is on an expression, not on columns" for k in keys if k.expression]
        found = [list(k.columns) for k in keys if not k.expression and not k.partial and k.valid]
        raise PermanentChunkError(
            f"destination table {str(table)!r} has no unique constraint or unique index on exactly "
            f"key_columns={spec.key_columns} (found {found or 'none'}{'; ' + '; '.join(why) if why else ''}); "
            f"add one, e.g. ALTER TABLE ... ADD PRIMARY KEY ({cols}), or fix key_columns"
        )
    deferrable = [k for k in arbiters if k.deferrable]
    if deferrable:
        names = ", ".join(k.label for k in deferrable)
        name = deferrable[0].constraint or deferrable[0].index
        raise PermanentChunkError(
            f"destination table {str(table)!r}: {names} on ({cols}) is DEFERRABLE, and INSERT ... ON CONFLICT "
            f"cannot use a deferrable constraint as its arbiter; make it immediate "
            f"(ALTER TABLE {table} ALTER CONSTRAINT {name} NOT DEFERRABLE) or key on another unique key"
        )
    not_null = {c.name for c in dest_cols if c.not_null}
    nullable = [c for c in spec.key_columns if c not in not_null]
    if nullable and not any(k.nulls_not_distinct for k in arbiters):
        names = ", ".join(k.label for k in arbiters)
        raise PermanentChunkError(
            f"destination table {str(table)!r}: key column(s) {nullable} of {names} on ({cols}) allow NULL, and "
            "a unique key treats NULLs as distinct: a row with a NULL key never conflicts, so every rerun (and "
            "every live run) would insert it again. Make them NOT NULL "
            f"({'; '.join(f'ALTER TABLE {table} ALTER COLUMN {c} SET NOT NULL' for c in nullable)}), or on "
            f"PostgreSQL 15+ recreate the key as UNIQUE NULLS NOT DISTINCT ({cols})"
        )


def plan_columns(
    spec: BackfillSpec,
    dest_cols: list[Column],
    src_cols: list[Column],
    *,
    expressions: dict[str, str] | None = None,
    dest_types: dict[str, casts.TypeInfo] | None = None,
    src_types: dict[str, casts.TypeInfo] | None = None,
) -> ColumnPlan:
    """One select expression per destination column, cast to the destination type.

    ``expressions`` (historical mode) are spec-author SQL for a column; they win over same-name columns.
    With both sides' type facts (:func:`describe_types`), also how each value travels (see casts.py):
    the chunk path passes them; validation, which only reads the source, does not need them.
    """
    expressions = expressions or {}
    wanted = spec.columns or [c.name for c in dest_cols]
    by_name = {c.name: c for c in dest_cols}
    src_names = {c.name for c in src_cols}
    for required in (spec.time_column, *spec.key_columns):
        if required not in src_names and required not in expressions:
            raise PermanentChunkError(
                f"source table {spec.source_table!r} has no column {required!r} (needed as time/key column); "
                f"its columns are {sorted(src_names)}"
            )
    src_type_sql = {c.name: c.type_sql for c in src_cols}
    exprs: list[sql.Composable] = []
    raws: list[sql.Composable | None] = []
    decisions: list[str] = []
    for name in wanted:
        col = by_name[name]
        type_sql = sql.SQL(cast_type(col.type_sql))  # from the destination catalog, not from user input
        if name in expressions:
            # trusted spec-author SQL (historical mode); wrapped so operator precedence cannot leak
            raw = sql.SQL("({e})").format(e=sql.SQL(expressions[name]))
            exprs.append(sql.SQL("{r}::{t}").format(r=raw, t=type_sql))
            decisions.append(f"{name}: expression ({expressions[name]}) cast to {col.type_sql}")
        elif name in src_names:
            raw = sql.Identifier(name)
            exprs.append(sql.SQL("{c}::{t}").format(c=raw, t=type_sql))
            if src_type_sql[name] != col.type_sql:
                decisions.append(f"{name}: source type {src_type_sql[name]} cast to {col.type_sql}")
        else:
            raw = None
            exprs.append(sql.SQL("NULL::{t}").format(t=type_sql))
            decisions.append(f"{name}: missing in source, loaded as NULL::{col.type_sql}")
        raws.append(raw)
    ignored = sorted(src_names - set(by_name))
    if ignored:
        decisions.append(f"source-only columns ignored: {ignored}")
    t = spec.time_column
    # a historical expression for the time column is also what the chunk range is compared with
    time_filter = sql.SQL("({e})").format(e=sql.SQL(expressions[t])) if t in expressions else sql.Identifier(t)
    plan = ColumnPlan(
        columns=list(wanted),
        select_exprs=exprs,
        decisions=decisions,
        raw_exprs=raws,
        types=[by_name[n].type_sql for n in wanted],
        time_filter=time_filter,
        time_source_type=None if t in expressions else src_type_sql.get(t),
        copy_exprs=list(exprs),
        stage_types=[None] * len(wanted),
        insert_exprs=[sql.Identifier(n) for n in wanted],
        dest_casts=[None] * len(wanted),
        check_types=[(by_name[n].type_sql, cast_type(by_name[n].type_sql)) for n in wanted],
    )
    if dest_types is not None and src_types is not None:
        _route(spec, plan, dest_types, src_types)
    return plan


def _lossy_allowed(spec: BackfillSpec, column: str) -> bool:
    allowed = spec.allow_lossy_casts
    return allowed is True or (isinstance(allowed, list) and column in allowed)


def _route(spec: BackfillSpec, plan: ColumnPlan, dest_types: dict, src_types: dict) -> None:
    """Decide per column where the cast runs and what the staging column holds (module doc of casts.py)."""
    if isinstance(spec.allow_lossy_casts, list):
        unknown = [c for c in spec.allow_lossy_casts if c not in plan.columns]
        if unknown:
            raise PermanentChunkError(
                f"allow_lossy_casts lists {unknown}, which are not loaded columns of the destination "
                f"(loaded: {plan.columns}); fix the names or remove them"
            )
    for i, name in enumerate(plan.columns):
        t = dest_types.get(name)
        if t is None:
            continue
        col = sql.Identifier(name)
        raw = plan.raw_exprs[i]
        # the source can produce T's wire format by a cast to a built-in type: stage as T itself
        source_side = casts.source_castable(t)
        to_t = sql.SQL(casts.unbounded(t))  # destination catalog text, not user input
        s = src_types.get(name) if isinstance(raw, sql.Identifier) else None
        if s is not None and s.type_sql == t.type_sql:
            if t.portable:  # the same type on both sides: no cast anywhere
                plan.copy_exprs[i], plan.check_types[i] = col, None
                continue
            source_side = False
        elif s is not None and not (casts.lossless(s, t) and source_side):
            # may round, or T only exists in the destination: stage the source's own value, cast there
            # text when T holds user-defined elements: an explicit array cast to a length-limited domain
            # element cuts silently, while parsing the array's text checks every element
            if s.base_builtin and s.portable and t.portable:
                wire_info, wire = s, s.base_sql
                plan.copy_exprs[i] = (
                    col if s.type_sql == s.base_sql else sql.SQL("{c}::{w}").format(c=col, w=sql.SQL(wire))
                )
            else:
                wire_info, wire = None, "text"
                plan.copy_exprs[i] = sql.SQL("{c}::text").format(c=col)
            plan.stage_types[i] = wire
            plan.insert_exprs[i] = sql.SQL("{c}::{t}").format(c=col, t=to_t)
            plan.dest_casts[i] = casts.unbounded(t)
            plan.check_types[i] = (t.base_sql, casts.unbounded(t)) if t.base_builtin else None
            lossy = not casts.lossless(s, t) and wire_info is not None
            if lossy and _lossy_allowed(spec, name):
                _note_decision(plan, name, "rounding allowed by allow_lossy_casts")
            elif lossy and (test := casts.rounding_test(name, wire_info, wire, t)) is not None:
                plan.lossy.append(LossyCast(name, s.type_sql, t.type_sql, *test))
                _note_decision(plan, name, "each value checked: one the cast would change fails the chunk")
            if not source_side:
                _note_decision(plan, name, "cast in the destination")
            continue
        if source_side:
            plan.copy_exprs[i] = (
                sql.SQL("NULL::{t}").format(t=to_t) if raw is None else sql.SQL("{r}::{t}").format(r=raw, t=to_t)
            )
            plan.check_types[i] = (t.base_sql, casts.unbounded(t))
        else:  # T (or a type inside it) is the destination's own: send text, cast in the destination
            plan.copy_exprs[i] = sql.SQL("NULL::text") if raw is None else sql.SQL("{r}::text").format(r=raw)
            plan.stage_types[i] = "text"
            plan.insert_exprs[i] = sql.SQL("{c}::{t}").format(c=col, t=to_t)
            plan.dest_casts[i] = casts.unbounded(t)
            plan.check_types[i] = None
    non_keys = [c for c in plan.columns if c not in spec.key_columns]
    if non_keys and all(c in dest_types for c in non_keys):
        plan.changed = casts.changed_predicate(non_keys, dest_types)


def _note_decision(plan: ColumnPlan, column: str, note: str) -> None:
    """Append to the column's decision (added if it had none, e.g. same type name but cast as text)."""
    prefix = f"{column}: "
    for j, d in enumerate(plan.decisions):
        if d.startswith(prefix):
            plan.decisions[j] = f"{d} ({note})"
            return
    plan.decisions.append(f"{column}: {note}")


_LENGTH_TYPES = {"character varying": "character varying", "character": "bpchar", "bit varying": "bit varying"}


def cast_type(type_sql: str) -> str:
    """The type the source query casts to: the destination type, minus a length limit.

    An explicit cast to ``varchar(n)``/``char(n)``/``varbit(n)`` silently truncates (SQL standard); without
    the limit in the cast, the destination's COPY checks the length and a too-long value fails the chunk
    instead of being cut. The wire format is the same, so binary COPY still lines up.
    """
    base, paren, _ = type_sql.partition("(")
    if paren and base in _LENGTH_TYPES and not type_sql.endswith("[]"):
        return _LENGTH_TYPES[base]
    return type_sql


_LEADING_INDEX = """
SELECT EXISTS (
  SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
  WHERE i.indrelid = %s AND a.attname = %s
)
"""


def time_column_indexed(conn, table: TableName, column: str) -> bool:
    """Without an index leading on the time column every chunk scans the whole source table."""
    oid = table_oid(conn, table, side="source")
    with conn.cursor() as cur:
        cur.execute(_LEADING_INDEX, (oid, column))
        return bool(cur.fetchone()[0])
