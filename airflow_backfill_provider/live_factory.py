"""build_live_dag(spec): the live-ingest DAG for a spec with ``live.enabled``, from the same YAML as the backfill.

Kept apart from ``factory.py`` on purpose: no backfill module may reach the watermark writer.
Parse-time cheap: no database or network access.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pendulum

from airflow_backfill_provider.core.compat import DAG
from airflow_backfill_provider.operators.live import LiveIngestOperator
from airflow_backfill_provider.core.spec import BackfillSpec, load_spec

DOC = """\
### Live ingest into `{dest}` from `{src}`

Every run loads the source rows whose `{cursor}` is above the watermark minus {lookback:g} s, newer-wins,
and advances the watermark in the same destination transaction (table `{wm}`). The backfill DAG
`{backfill}` clips its range to this watermark and never writes it.
"""


def build_live_dag(spec: dict[str, Any] | BackfillSpec, **dag_kwargs: Any) -> DAG | None:
    """The live DAG (one ``live_ingest`` task on ``live.schedule``), or None when ``live.enabled`` is false."""
    spec = load_spec(spec)
    if not spec.live.enabled:
        return None
    start = spec.start_date
    defaults: dict[str, Any] = dict(
        dag_id=spec.live_dag_id,
        schedule=spec.live.schedule,
        start_date=pendulum.datetime(start.year, start.month, start.day, tz=spec.timezone),
        catchup=False,  # live ingest catches up by itself: one run reads everything since the watermark
        max_active_runs=1,
        tags=["live-ingest", *spec.tags],
        doc_md=DOC.format(
            dest=spec.destination_table,
            src=spec.source_table,
            cursor=spec.live_cursor_column,
            lookback=spec.live.lookback_s,
            wm=spec.watermark.table,
            backfill=spec.effective_dag_id,
        ),
    )
    defaults.update(dag_kwargs)
    with DAG(**defaults) as dag:
        LiveIngestOperator(
            task_id="live_ingest",
            spec=spec.model_dump(mode="json"),
            retries=spec.retries,
            retry_delay=dt.timedelta(seconds=min(spec.retry_delay_s, 60)),
        )
    return dag


def register_live(config_dir: str | os.PathLike, namespace: dict[str, Any], *, strict: bool | None = None):
    """Like :func:`loader.register`, for the live DAGs of the specs that enable ``live``."""
    from airflow_backfill_provider.loader import register

    return register(config_dir, namespace, strict=strict, build=build_live_dag)
