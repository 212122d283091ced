"""OpenLineage for the chunk, live and merge operators: input and output tables, their schemas, rows written.

Named as the postgres provider names PostgreSQL tables: namespace ``postgres://host:port``, name
``database.schema.table``. Everything from the OpenLineage provider is imported inside the methods, so the
provider works without it; the methods are called only by its listener (when OpenLineage is enabled), and
the catalog reads they need run then, once per task instance (start and complete share them).
"""

from __future__ import annotations

import logging
from typing import Any

from airflow_backfill_provider.core.spec import TableName

log = logging.getLogger(__name__)


def _location(conn_id_or_dsn: str) -> tuple[str, str]:
    """(namespace, database) of a connection id or DSN, as the postgres provider names them."""
    from psycopg2.extensions import parse_dsn

    from airflow_backfill_provider.connections import connection_kwargs

    kwargs = connection_kwargs(conn_id_or_dsn)
    if "dsn" in kwargs:
        kwargs = {**parse_dsn(kwargs["dsn"]), **{k: v for k, v in kwargs.items() if k != "dsn"}}
    host = kwargs.get("host") or "localhost"
    port = kwargs.get("port") or 5432
    return f"postgres://{host}:{port}", str(kwargs.get("dbname") or "postgres")


def _fields(conn_id_or_dsn: str, table: TableName, side: str) -> list[tuple[str, str]]:
    from airflow_backfill_provider.connections import close_all, connect
    from airflow_backfill_provider.prepare.catalog import describe_table

    conn = connect(conn_id_or_dsn, application_name="backfill:lineage", readonly=True, statement_timeout_s=10)
    try:
        cols, _ = describe_table(conn, table, side=side)
        return [(c.name, c.type_sql) for c in cols]
    finally:
        close_all(conn)


def _dataset(kind: str, conn_id_or_dsn: str, table: TableName, side: str, rows: int | None = None, cache=None):
    from airflow.providers.common.compat.openlineage.facet import (
        InputDataset,
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
        SchemaDatasetFacet,
        SchemaDatasetFacetFields,
    )

    namespace, database = _location(conn_id_or_dsn)
    name = f"{database}.{table.schema_ or 'public'}.{table.name}"
    facets: dict[str, Any] = {}
    cache = {} if cache is None else cache
    try:
        key = (conn_id_or_dsn, str(table))
        if key not in cache:  # read once: start and complete share it (a swap merge drops its input)
            cache[key] = _fields(conn_id_or_dsn, table, side)
        facets["schema"] = SchemaDatasetFacet(fields=[SchemaDatasetFacetFields(name=n, type=t) for n, t in cache[key]])
    except Exception as err:  # lineage must never fail a task: the table may be gone (swap merge)  # noqa: BLE001 - best effort: never fails the task
        log.info("No schema facet for %s (%s)", name, str(err).strip())
    if kind == "input":
        return InputDataset(namespace=namespace, name=name, facets=facets)
    out_facets: dict[str, Any] = (
        {"outputStatistics": OutputStatisticsOutputDatasetFacet(rowCount=rows)} if rows is not None else {}
    )
    return OutputDataset(namespace=namespace, name=name, facets=facets, outputFacets=out_facets)


class LineageMixin:
    """``get_openlineage_facets_on_start/complete`` for an operator with ``self.spec`` and ``_lineage_tables()``.

    ``_lineage_tables()`` returns ``[(kind, conn_id, table, side)]``; ``self._lineage_rows`` (set by execute)
    becomes the output's row count.
    """

    _lineage_rows: int | None = None

    def _lineage_tables(self) -> list[tuple[str, str, TableName, str]]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _lineage(self, rows: int | None):
        from airflow.providers.openlineage.extractors import OperatorLineage

        try:
            tables = self._lineage_tables()
            cache = self.__dict__.setdefault("_lineage_fields", {})
            inputs = [_dataset(k, c, t, s, cache=cache) for k, c, t, s in tables if k == "input"]
            outputs = [_dataset(k, c, t, s, rows, cache=cache) for k, c, t, s in tables if k == "output"]
        except Exception as err:  # never fail a task for lineage  # noqa: BLE001 - best effort: never fails the task
            log.warning("OpenLineage datasets unavailable: %s", err)
            return OperatorLineage()
        return OperatorLineage(inputs=inputs, outputs=outputs)

    def get_openlineage_facets_on_start(self):
        return self._lineage(None)

    def get_openlineage_facets_on_complete(self, task_instance=None):
        return self._lineage(self._lineage_rows)

    def get_openlineage_facets_on_failure(self, task_instance=None):
        return self._lineage(None)


def chunk_tables(spec, chunk_descriptor: dict) -> list[tuple[str, str, TableName, str]]:
    """The chunks read their source tables (the historical one for each range) and write the staging target."""
    from airflow_backfill_provider.plan.batches import expand
    from airflow_backfill_provider.prepare.source import source_for

    sources = {str(t): t for t in (source_for(spec, c)[0] for c in expand(chunk_descriptor, spec))}
    return [*(("input", spec.source_conn_id, t, "source") for t in sources.values()),
            ("output", spec.destination_conn_id, spec.staging_target, "destination")]  # fmt: skip


def live_tables(spec) -> list[tuple[str, str, TableName, str]]:
    return [("input", spec.source_conn_id, spec.source, "source"),
            ("output", spec.destination_conn_id, spec.destination, "destination")]  # fmt: skip


def merge_tables(spec) -> list[tuple[str, str, TableName, str]]:
    """Swap mode's merge: the parallel table (dropped by the merge: no schema then) into the live table."""
    return [("input", spec.destination_conn_id, spec.staging_target, "destination"),
            ("output", spec.destination_conn_id, spec.destination, "destination")]  # fmt: skip
