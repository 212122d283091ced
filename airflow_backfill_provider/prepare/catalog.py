"""Read table shapes from the catalogs: columns, types, unique keys, leading indexes; check the destination.

What each chunk selects from these shapes (schema drift) is decided in prepare/drift.py.
"""

from __future__ import annotations

from dataclasses import dataclass


from airflow_backfill_provider.prepare import casts
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.core.spec import BackfillSpec, TableName


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str  # format_type() output from the catalog, e.g. 'numeric(12,2)'
    not_null: bool = False
    has_default: bool = False  # a DEFAULT expression (what the table fills when an INSERT leaves it out)
    identity: str = ""  # pg_attribute.attidentity: 'a' GENERATED ALWAYS, 'd' BY DEFAULT, '' none
    generated: str = ""  # pg_attribute.attgenerated: 's' stored (PostgreSQL 12+), 'v' virtual (18+), '' none

    @property
    def filled_by_table(self) -> bool:
        """The table fills it when an INSERT or COPY leaves it out: a default, an identity, or generated."""
        return self.has_default or bool(self.identity) or bool(self.generated)


FIND_TABLE = """
SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %(name)s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND (n.nspname = %(schema)s OR (%(schema)s IS NULL AND n.nspname = ANY (current_schemas(false))))
ORDER BY array_position(current_schemas(false), n.nspname) NULLS LAST
LIMIT 1
"""

# the table, its columns and its unique keys in one statement (constant SQL; the names are bound parameters)
_DESCRIBE = (
    "WITH t AS ("
    + FIND_TABLE
    + """)
SELECT t.oid,
       -- generated columns too: a source's can be read; a destination's is never written (prepare/drift.py)
       (SELECT json_agg(json_build_array(a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                                         a.atthasdef AND a.attgenerated = '', a.attidentity, a.attgenerated)
                        ORDER BY a.attnum)
          FROM pg_attribute a
         WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped),
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
        cur.execute(casts.TYPES_SQL.replace("{find}", FIND_TABLE), {"name": table.name, "schema": table.schema_})
        return casts.type_infos(cur.fetchall())


def table_oid(conn, table: TableName, *, side: str) -> int:
    with conn.cursor() as cur:
        cur.execute(FIND_TABLE, {"name": table.name, "schema": table.schema_})
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
