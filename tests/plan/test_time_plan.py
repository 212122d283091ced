"""Under Airflow (dag.test): the plan refuses hour chunks on a date column, also when a run param asks for them."""

from __future__ import annotations

import json

from tests.conftest import fetch_all
from tests.specs import table_spec


def test_param_granularity_hour_on_a_date_column_fails_the_plan_before_any_write(
    src_url, dst_url, pg, airflow_db, tmp_path, monkeypatch
):
    for url in (src_url, dst_url):
        pg(url).cursor().execute("CREATE TABLE ev (id bigint PRIMARY KEY, d date NOT NULL, v integer)")
    pg(src_url).cursor().execute("INSERT INTO ev SELECT g, date '2024-01-01' + g % 3, g FROM generate_series(1, 30) g")
    spec = table_spec(
        src_url, dst_url, "ev", time_column="d", name="ev_dates", timezone="America/New_York", granularity="day"
    )
    from airflow import settings

    from airflow_backfill_provider.factory import build_backfill_dag

    (tmp_path / "spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    (tmp_path / "ev_dag.py").write_text(
        "import json, pathlib\n"
        "from airflow_backfill_provider.factory import build_backfill_dag\n"
        "dag = build_backfill_dag(json.loads((pathlib.Path(__file__).parent / 'spec.json').read_text()))\n"
    )
    monkeypatch.setattr(settings, "DAGS_FOLDER", str(tmp_path))  # dag.test() on 3.x syncs the dags folder
    dag = build_backfill_dag(spec)
    run = dag.test(run_conf={"start": "2024-01-01", "end": "2024-01-04", "granularity": "hour", "dry_run": False})
    states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in run.get_task_instances()}
    assert states["plan"] == "failed"
    assert fetch_all(dst_url, "SELECT count(*) FROM ev") == [(0,)]
    assert fetch_all(dst_url, "SELECT to_regclass('backfill_ledger') IS NULL") == [(True,)]
    # the spec's own granularity (day) loads every date exactly
    run = dag.test(run_conf={"start": "2024-01-01", "end": "2024-01-04", "granularity": "day", "dry_run": False})
    assert str(getattr(run.state, "value", run.state)) == "success"
    assert fetch_all(dst_url, "SELECT count(*), sum(v) FROM ev") == fetch_all(
        src_url, "SELECT count(*), sum(v) FROM ev"
    )
