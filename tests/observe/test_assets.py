"""A validated backfill run emits the destination table's asset (dataset on 2.11) event with range and rows."""

from __future__ import annotations

import datetime as dt

import pytest

from airflow_backfill_provider.core.compat import AIRFLOW_V_3
from tests.seed import create_orders, seed_orders
from tests.conftest import REPO


@pytest.fixture()
def dag(airflow_db, src_url, dst_url, pg, monkeypatch):
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2023, 1, 1))
    create_orders(pg(dst_url))
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_SOURCE_PG", src_url)
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_DEST_PG", dst_url)
    from airflow_backfill_provider.loader import load_backfill_dags

    return load_backfill_dags(REPO / "dags" / "configs", strict=True).dags["backfill_orders"]


def events_of(run_id: str) -> list[tuple[str, dict]]:
    from airflow.utils.session import create_session

    if AIRFLOW_V_3:
        from airflow.models.asset import AssetEvent as Event, AssetModel as Model

        join = Event.asset_id == Model.id
    else:
        from airflow.models.dataset import DatasetEvent as Event, DatasetModel as Model

        join = Event.dataset_id == Model.id
    with create_session() as session:
        rows = session.query(Model.uri, Event.extra).join(Model, join).filter(Event.source_run_id == run_id).all()
    return [(uri, dict(extra or {})) for uri, extra in rows]


def state(run) -> str:
    return str(getattr(run.state, "value", run.state))


def test_validated_run_emits_the_destination_asset_with_range_and_rows(dag):
    validate = dag.get_task("validate")
    assert [o.uri for o in validate.outlets] == ["backfill://backfill_dest_pg/public.orders"]
    if not AIRFLOW_V_3:
        dag.sync_to_db()  # 2.11's dag.test() does not register the DAG's datasets; the DAG processor would
    run = dag.test(run_conf={"start": "2023-01-01", "end": "2023-01-03"})
    assert state(run) == "success"
    ((uri, extra),) = events_of(run.run_id)
    assert uri == "backfill://backfill_dest_pg/public.orders"
    assert extra == {
        "range_start": "2023-01-01T00:00:00+00:00", "range_end": "2023-01-03T00:00:00+00:00", "rows": 200,
        "status": "pass", "days": 2, "dag_id": "backfill_orders", "run_id": run.run_id,
    }  # fmt: skip


def test_failed_validation_and_dry_run_emit_nothing(dag, dst_url, pg):
    run = dag.test(run_conf={"start": "2023-01-01", "end": "2023-01-02", "dry_run": True})
    assert state(run) == "success" and events_of(run.run_id) == []
    pg(dst_url).cursor().execute(  # rows the source never had: validation fails
        "INSERT INTO orders SELECT 9000000 + g, 1, 'new', 1, '2023-01-02T12:00Z', '2023-01-02T12:00Z', NULL "
        "FROM generate_series(1, 10) g"
    )
    # dry_run given again: a second dag.test() on the same DAG object keeps the previous run's params
    run = dag.test(run_conf={"start": "2023-01-02", "end": "2023-01-03", "dry_run": False})
    assert state(run) == "failed" and events_of(run.run_id) == []
