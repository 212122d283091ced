"""What a chunk reads on the source: which relation and column expressions its range selects (historical
mode), and the column plan checked against the catalogs of both sides before any write.

Shared by planning (pre-flight), the chunk transfer, validation and lineage, so all of them agree on the
table and expressions a range reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from airflow_backfill_provider import drift, schema, timebounds
from airflow_backfill_provider.chunks import Chunk, to_datetime, utc
from airflow_backfill_provider.spec import BackfillSpec, TableName


def source_range(spec: BackfillSpec, chunk: Chunk) -> int | None:
    """Which historical range reads ``chunk``: the first whose ``until`` is after the chunk start (chunks are
    split at every ``until``); None: the current source table, as it is."""
    for i, rng in enumerate(spec.historical):
        if utc(chunk.start) < utc(to_datetime(rng.until, spec.timezone, what="historical.until")):
            return i
    return None


def source_for(spec: BackfillSpec, chunk: Chunk) -> tuple[TableName, dict[str, str]]:
    """The table ``chunk`` reads and the column expressions of its historical range (none: plain columns)."""
    i = source_range(spec, chunk)
    if i is None:
        return spec.source, {}
    rng = spec.historical[i]
    return (TableName.parse(rng.source_table) if rng.source_table else spec.source), dict(rng.column_expressions)


def one_per_source(spec: BackfillSpec, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """The first chunk of each source range: enough to check every table and expression set once."""
    seen: set[int | None] = set()
    for chunk in chunks:
        i = source_range(spec, chunk)
        if i not in seen:
            seen.add(i)
            yield chunk


def prepare(spec: BackfillSpec, src_conn, dst_conn, chunk: Chunk) -> tuple[TableName, drift.ColumnPlan]:
    """Catalog checks before any write: tables, columns, unique key; then what to select."""
    target = spec.staging_target
    dest_cols, dest_keys = schema.describe_table(dst_conn, target, side="destination")
    schema.check_destination(spec, dest_cols, dest_keys, target)
    src_table, expressions = source_for(spec, chunk)
    src_cols, _ = schema.describe_table(src_conn, src_table, side="source")
    plan = drift.plan_columns(
        spec,
        dest_cols,
        src_cols,
        expressions=expressions,
        dest_types=schema.describe_types(dst_conn, target),
        src_types=schema.describe_types(src_conn, src_table),
    )
    # chunk bounds are literals of the filtered column's own type (timebounds.py)
    plan.time_kind = timebounds.source_kind(src_conn, src_table, plan)
    timebounds.check_granularity(plan.time_kind, spec.granularity, column=spec.time_column)
    return src_table, plan
