"""build_backfill_dag(spec): a spec in, a ready backfill DAG out.

Parse-time cheap: builds from the static spec only (no database, no network).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pendulum

from airflow_backfill_provider.assets import destination_asset
from airflow_backfill_provider.core.chunks import GRANULARITIES
from airflow_backfill_provider.core.compat import (
    DAG,
    EXPONENTIAL_BACKOFF,
    Param,
)
from airflow_backfill_provider.operators.chunk import MAP_INDEX_TEMPLATE, BackfillChunkOperator
from airflow_backfill_provider.operators.merge import MergeBackfillOperator
from airflow_backfill_provider.operators.plan import PlanBackfillOperator
from airflow_backfill_provider.operators.validate import ValidateBackfillOperator
from airflow_backfill_provider.core.spec import BackfillSpec, load_spec
from airflow_backfill_provider.timetables import backfill_timetable

DOC = """\
### Backfill `{dest}` from `{src}`

Chunks of one **{gran}** (timezone `{tz}`), half-open `[start, end)`, loaded newer-wins
(`{version}`), at most as many at once as the pool **`{pool}`** has slots.

* **Trigger** with the form: `start` and `end` (YYYY-MM-DD, end exclusive). `dry_run` lists the chunks
  and writes nothing; `reprocess` loads chunks again even if the ledger says they are done.
* **Backfill command** over a range uses each run's data interval (one {gran} per run).
* **Retry a chunk**: clear its failed mapped task instance (labelled by its date) in the grid.
* **Many chunks** (more than {maxmapped}): each mapped task instance is a batch of consecutive chunks,
  labelled by its range; each chunk commits alone, and clearing a batch reruns only its chunks not in the ledger.
* **Deferred** (purple) chunks are waiting for the source's load to drop or for their pacing turn,
  without holding a worker; a chunk that met critical load failed on purpose and is not retried.
{swap}
The pool must exist: `airflow pools set {pool} 4 "source slots for backfills" --include-deferred`
(see docs/source-protection.md).
"""


SWAP_DOC = """
**Pattern B (swap mode)**: chunks load into `{par}`; the final `merge` task inserts its rows whose key
`{dest}` lacks (`ON CONFLICT DO NOTHING`: live rows are never touched) and drops `{par}`, in one
transaction. If the merge fails nothing is applied: fix the cause and clear `merge`. Runs are serialized
(`max_active_runs=1`) because each merge consumes the whole parallel table.
"""


def backfill_params(spec: BackfillSpec) -> dict[str, Any]:
    """The trigger form. Dates are validated by the form (format: date) before a run is created."""
    return {
        "start": Param(
            None,
            type=["null", "string"],
            format="date",
            title="Start (inclusive)",
            description="First day to load, YYYY-MM-DD, in the spec's timezone. Leave empty for scheduled/backfill runs.",
        ),
        "end": Param(
            None,
            type=["null", "string"],
            format="date",
            title="End (exclusive)",
            description="Day after the last day to load, YYYY-MM-DD: [start, end) is loaded.",
        ),
        "granularity": Param(
            spec.granularity,
            type="string",
            enum=[*GRANULARITIES, "auto"],
            title="Chunk size",
            description="One mapped task instance per chunk ('auto': sized from the source's statistics; "
            "beyond max_mapped_chunks chunks run in batches). Ignored with chunk_by: key.",
        ),
        "reprocess": Param(False, type="boolean", title="Reprocess", description="Load chunks the ledger marks done."),
        "dry_run": Param(False, type="boolean", title="Dry run", description="List the chunks; write nothing."),
    }


def build_backfill_dag(spec: dict[str, Any] | BackfillSpec, **dag_kwargs: Any) -> DAG:
    """Build the backfill DAG for one spec: ``plan >> load_chunk[mapped] >> validate``.

    In swap mode (Pattern B): ``plan >> load_chunk[mapped] >> merge >> validate``.

    Extra keyword arguments go to ``DAG(...)`` (e.g. ``max_active_runs``, ``default_args``).
    """
    spec = load_spec(spec)
    spec_dict = spec.model_dump(mode="json")
    start = spec.start_date
    defaults: dict[str, Any] = dict(
        dag_id=spec.effective_dag_id,
        # a data-interval timetable: each backfill run covers [interval start, interval end); on Airflow 3
        # with the provider's plugin loaded it creates no automatic runs (timetables.py: no surprise schedule)
        schedule=backfill_timetable(spec.effective_schedule, spec.timezone),
        start_date=pendulum.datetime(start.year, start.month, start.day, tz=spec.timezone),
        catchup=False,
        params=backfill_params(spec),
        tags=["backfill", *spec.tags],
        doc_md=DOC.format(
            dest=spec.destination_table,
            src=spec.source_table,
            gran=spec.granularity,
            tz=spec.timezone,
            version=spec.version_column or f"no version column: {spec.conflict_policy}",
            pool=spec.pool,
            maxmapped=spec.max_mapped_chunks,
            swap=SWAP_DOC.format(dest=spec.destination_table, par=spec.staging_target) if spec.mode == "swap" else "",
        ),
        max_active_tasks=16,
    )
    if spec.mode == "swap":
        defaults["max_active_runs"] = 1  # one merge consumes the whole parallel table: no overlapping runs
    defaults.update(dag_kwargs)
    with DAG(**defaults) as dag:
        plan = PlanBackfillOperator(task_id="plan", spec=spec_dict, retries=1, retry_delay=dt.timedelta(seconds=10))
        load = BackfillChunkOperator.partial(
            task_id="load_chunk",
            spec=spec_dict,
            pool=spec.pool,
            retries=spec.retries,
            retry_delay=dt.timedelta(seconds=spec.retry_delay_s),
            retry_exponential_backoff=EXPONENTIAL_BACKOFF,
            max_retry_delay=dt.timedelta(minutes=30),
            map_index_template=MAP_INDEX_TEMPLATE,
            # per-chunk figures live in the ledger table and the task log; an XCom per chunk would only
            # add an API round trip to every task instance
            do_xcom_push=False,
        ).expand(chunk=plan.output)
        last = load
        if spec.mode == "swap":
            # none_failed, not all_success: a run whose chunks are all in the ledger already (zero mapped
            # instances, so load_chunk is skipped) must still merge; a dry run skips itself in the operator
            last = load >> MergeBackfillOperator(
                task_id="merge",
                spec=spec_dict,
                trigger_rule="none_failed",
                retries=spec.retries,
                retry_delay=dt.timedelta(seconds=spec.retry_delay_s),
            )
        if spec.validation.enabled:
            # a run is green only when validation passed: it runs after the chunks (after the merge in swap
            # mode: it compares the live table) also when the plan skipped every chunk as done in the ledger
            # (zero mapped instances: load_chunk is skipped), and checks the whole planned range, so a ledger
            # claim the destination no longer honours fails the run. none_failed: not after a failed chunk;
            # plan as a direct upstream: a skipped-only upstream still lets it run. A dry run skips itself.
            # a passing (or only warning) validation emits the destination table's asset event (assets.py)
            validate = ValidateBackfillOperator(
                task_id="validate",
                spec=spec_dict,
                retries=1,
                retry_delay=dt.timedelta(seconds=30),
                outlets=[destination_asset(spec)],
                trigger_rule="none_failed",
            )
            if last is load:  # swap mode: the merge (none_failed) always runs, validate follows it
                plan >> validate
            last >> validate
    return dag
