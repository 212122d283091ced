"""MergeBackfillOperator: Pattern B's final step, ``<table>_backfill`` into the live table in one transaction."""

from __future__ import annotations

from typing import Any, Sequence

from airflow_backfill_provider.core.compat import AirflowFailException, AirflowSkipException, BaseOperator
from airflow_backfill_provider.observe.lineage import LineageMixin
from airflow_backfill_provider.core.spec import BackfillSpec


class MergeBackfillOperator(LineageMixin, BaseOperator):
    """Insert the parallel table's rows whose key the live table lacks, drop it, forget its ledger rows.

    One destination transaction: if anything fails nothing is applied (the parallel table and its ledger
    rows stay), and clearing this task runs the merge again. Live rows are never modified
    (``ON CONFLICT DO NOTHING``). Skipped when the plan was a dry run.

    :param spec: the backfill spec (dict or :class:`BackfillSpec`) with ``mode: swap``.
    :param plan_task_id: the plan task whose XCom ``plan`` says whether this run is a dry run.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#fcf8e3"

    def __init__(self, *, spec: dict[str, Any] | BackfillSpec, plan_task_id: str | None = "plan", **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec.model_dump(mode="json") if isinstance(spec, BackfillSpec) else dict(spec)
        self.plan_task_id = plan_task_id

    def _lineage_tables(self):
        from airflow_backfill_provider.observe.lineage import merge_tables
        from airflow_backfill_provider.core.spec import load_spec

        return merge_tables(load_spec(self.spec))

    def execute(self, context) -> dict:
        from airflow_backfill_provider.core.exceptions import PermanentChunkError
        from airflow_backfill_provider.core.spec import load_spec
        from airflow_backfill_provider.prepare.swap import merge_parallel_table

        spec = load_spec(self.spec)
        if self.plan_task_id:
            summary = context["ti"].xcom_pull(task_ids=self.plan_task_id, key="plan") or {}
            if summary.get("dry_run"):
                raise AirflowSkipException("dry run: nothing was loaded, nothing to merge")
        try:
            result = merge_parallel_table(spec, dag_id=self.dag_id)
        except PermanentChunkError as err:
            raise AirflowFailException(str(err)) from err
        self._lineage_rows = result.inserted if result.merged else 0  # OpenLineage output row count
        if not result.merged:
            self.log.info("No %s to merge (already merged, or no chunk loaded yet)", result.parallel_table)
        else:
            self.log.info(
                "Merged %s into %s: %d rows, %d inserted, %d keys already live (kept), in %.2fs; parallel table dropped",
                result.parallel_table,
                result.target,
                result.rows_in_parallel,
                result.inserted,
                result.kept_live,
                result.seconds,
            )
        return result.to_dict()
