"""What a chunk reads on the source: which relation and column expressions its range selects (historical
mode). The column plan made from both catalogs is prepare/facts.py's.

Shared by planning (pre-flight), the chunk transfer, validation and lineage, so all of them agree on the
table and expressions a range reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from airflow_backfill_provider.core.chunks import Chunk, to_datetime, utc
from airflow_backfill_provider.core.spec import BackfillSpec, TableName


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
