"""First load of an empty range: COPY straight into the target, without the staging table and upsert.

When the destination holds no row in a chunk's range, newer-wins has nothing to compare: the upsert would
insert every staged row. The chunk then streams the source's COPY into the target itself, which skips
writing and re-reading a staging table and the conflict checks of ``INSERT ... ON CONFLICT`` (issue 15:
the staging path costs about as much again as the bare COPY pipe).

Still exactly newer-wins: if a row with a chunk row's key is there after all (live ingest wrote it after
the check, or, for a time chunk, it sits outside the chunk's time range), the target's unique index refuses
the COPY; the chunk rolls back to a savepoint, reads the source again and takes the staging path. So the
check only decides which path is tried first, never what ends up in the table.

Taken only where a plain COPY behaves as ``INSERT ... ON CONFLICT`` does: an ordinary (not partitioned)
table without triggers (foreign keys included), rules (COPY ignores rules) or row-level security (COPY
refuses it); every column staged as its destination type, with no cast and no rounding check in the
destination (prepare/drift.py); and an index leading on the column the range is checked on, so the check is an
index probe, not a scan.
"""

from __future__ import annotations

from psycopg2 import sql

from airflow_backfill_provider.core import timebounds
from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.prepare.drift import ColumnPlan
from airflow_backfill_provider.core.spec import BackfillSpec, TableName

SAVEPOINT = sql.Identifier("backfill_first_load")

# one round trip: the table may take a plain COPY, and (only then: CASE) no row of it is in the range
_CHECK = """
SELECT CASE WHEN c.relkind = 'r' AND NOT c.relhastriggers AND NOT c.relhasrules AND NOT c.relrowsecurity
             AND EXISTS (SELECT 1 FROM pg_index i
                           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                          WHERE i.indrelid = c.oid AND a.attname = {column_name} AND i.indisvalid
                            AND i.indpred IS NULL)
            THEN NOT EXISTS (SELECT 1 FROM {target} WHERE {range})
            ELSE false END
FROM pg_class c WHERE c.oid = {target_name}::regclass
"""


def eligible(plan: ColumnPlan) -> bool:
    """Every column travels as its destination type and lands as it is (no cast, no rounding check)."""
    return (
        not plan.lossy
        and all(t is None for t in plan.stage_types)
        and all(c is None for c in plan.dest_casts)
        and all(e == sql.Identifier(c) for e, c in zip(plan.insert_exprs, plan.columns, strict=True))
    )


def _range(spec: BackfillSpec, chunk: Chunk, plan: ColumnPlan) -> tuple[str, sql.Composable] | None:
    """(column, predicate) of the chunk's range on the destination; None where it cannot be checked."""
    if chunk.keyed:
        name = chunk.key_column
        if name not in plan.columns:
            return None
        k = sql.Identifier(name)
        parts: list[sql.Composable] = []
        if chunk.key_lo is not None:
            parts.append(sql.SQL("{k} >= {v}").format(k=k, v=sql.Literal(int(chunk.key_lo))))
        if chunk.key_hi is not None:
            parts.append(sql.SQL("{k} < {v}").format(k=k, v=sql.Literal(int(chunk.key_hi))))
        return name, sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")
    name = spec.time_column
    if name not in plan.columns:
        return None
    kind = timebounds.kind_of_type(plan.types[plan.columns.index(name)])  # the destination column's own type
    if kind is None:
        return None
    lo, hi = timebounds.bounds(kind, chunk.start, chunk.end, spec.timezone)
    t = sql.Identifier(name)
    return name, sql.SQL("{t} >= {lo} AND {t} < {hi}").format(t=t, lo=sql.Literal(lo), hi=sql.Literal(hi))


def empty_check(cur, target: TableName, spec: BackfillSpec, chunk: Chunk, plan: ColumnPlan) -> sql.Composed | None:
    """The statement whose one value says the target can take a plain COPY and has no row in the chunk's
    range (module docstring); None where the range cannot be checked."""
    found = _range(spec, chunk, plan)
    if found is None:
        return None
    column, predicate = found
    t = sql.Identifier(*target.parts)
    return sql.SQL(_CHECK).format(
        column_name=sql.Literal(column),
        target=t,
        range=predicate,
        target_name=sql.Literal(t.as_string(cur)),
    )
