"""BackfillChunkOperator: load one chunk. Mapped over the plan's descriptors, one instance per chunk."""

from __future__ import annotations

from typing import Any, Sequence

from airflow_backfill_provider.compat import AirflowFailException, BaseOperator
from airflow_backfill_provider.spec import BackfillSpec

#: label each mapped task instance by its chunk in the grid (instead of 0, 1, 2 ...)
MAP_INDEX_TEMPLATE = "{{ task.chunk['chunk_id'] }}"


class BackfillChunkOperator(BaseOperator):
    """Stream one chunk from source to destination and upsert it newer-wins, in one transaction.

    Transient failures (connection lost, serialization failure, deadlock, timeouts) raise and are
    retried by Airflow with exponential backoff; permanent ones (missing table or column, no unique
    key, bad cast) fail at once without retries, with a message that says what to fix.

    Map it with ``.partial(pool=...)`` (a classic operator honours it; ``@task`` would not).

    :param spec: the backfill spec (dict or :class:`BackfillSpec`).
    :param chunk: a descriptor from the plan task: ``{"chunk_id", "start", "end"}``.
    """

    template_fields: Sequence[str] = ("chunk",)
    ui_color = "#dff0d8"

    def __init__(self, *, spec: dict[str, Any] | BackfillSpec, chunk: dict[str, str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec.model_dump(mode="json") if isinstance(spec, BackfillSpec) else dict(spec)
        self.chunk = chunk

    def execute(self, context) -> dict:
        from airflow_backfill_provider.chunks import Chunk
        from airflow_backfill_provider.exceptions import PermanentChunkError, PlanError
        from airflow_backfill_provider.spec import load_spec
        from airflow_backfill_provider.transfer import transfer_chunk

        spec = load_spec(self.spec)
        try:
            chunk = Chunk.from_descriptor(self.chunk)
        except PlanError as err:
            raise AirflowFailException(str(err)) from err
        run_id = getattr(context.get("dag_run"), "run_id", None)
        try:
            result = transfer_chunk(spec, chunk, dag_id=self.dag_id, run_id=run_id)
        except PermanentChunkError as err:
            raise AirflowFailException(str(err)) from err
        self.log.info(
            "Chunk %s [%s, %s): %d rows extracted, %d inserted, %d updated, %d unchanged in %.2fs (%.0f rows/s)",
            result.chunk_id, result.start, result.end, result.rows_extracted, result.inserted, result.updated,
            result.unchanged, result.seconds, result.rows_per_s,
        )
        out = result.to_dict()
        out.pop("decisions", None)  # logged once by the plan; keep the XCom small
        return out
