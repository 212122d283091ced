"""The yardstick for (8): the example DAG's shape (a plan task, then N mapped classic task instances in
the same pool, labelled the same way), but every task does nothing. N comes from the ``n`` param."""

import datetime as dt

from airflow_backfill_provider.core.compat import DAG, BaseOperator, Param


class NoopPlanOperator(BaseOperator):
    def execute(self, context):
        return [{"chunk_id": f"noop-{i:04d}"} for i in range(int(context["params"]["n"]))]


class NoopChunkOperator(BaseOperator):
    template_fields = ("chunk",)

    def __init__(self, *, chunk, **kwargs):
        super().__init__(**kwargs)
        self.chunk = chunk

    def execute(self, context):
        return None


with DAG(
    dag_id="bench_noop_mapped",
    schedule=None,
    start_date=dt.datetime(2023, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    params={"n": Param(24, type="integer", minimum=0)},
    max_active_tasks=16,
    tags=["benchmark"],
):
    NoopChunkOperator.partial(
        task_id="load_chunk", pool="backfill_source", map_index_template="{{ task.chunk['chunk_id'] }}"
    ).expand(chunk=NoopPlanOperator(task_id="plan").output)
