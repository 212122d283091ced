"""A full run of the example DAG with dag.test() over 60 days moves exactly the source rows."""

import datetime as dt

import pytest

from tests.seed import create_orders, seed_orders
from tests.conftest import REPO, fetch_all, table_digest


@pytest.fixture()
def example_dag(airflow_db, src_url, dst_url, pg, monkeypatch):
    seed_orders(pg(src_url), rows=12000, days=60, start=dt.date(2023, 1, 1))
    # a row just outside the range must not be loaded
    pg(src_url).cursor().execute(
        "INSERT INTO orders VALUES (999999, 1, 'new', 1.00, '2023-03-02T00:00Z', '2023-03-02T00:00Z', NULL)"
    )
    create_orders(pg(dst_url))
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_SOURCE_PG", src_url)
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_DEST_PG", dst_url)
    from airflow_backfill_provider.loader import load_backfill_dags

    return load_backfill_dags(REPO / "dags" / "configs", strict=True).dags["backfill_orders"]


def test_dag_test_over_60_days_moves_exactly_the_source_rows(example_dag, src_url, dst_url, pg):
    run = example_dag.test(run_conf={"start": "2023-01-01", "end": "2023-03-02"})
    assert str(getattr(run.state, "value", run.state)) == "success"
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(12000,)]
    pg(src_url).cursor().execute("DELETE FROM orders WHERE id = 999999")
    assert table_digest(src_url) == table_digest(dst_url)
    ledger = fetch_all(dst_url, "SELECT count(*), sum(rows_extracted) FROM backfill_ledger")
    assert ledger == [(60, 12000)]


def test_dry_run_writes_nothing(example_dag, dst_url):
    run = example_dag.test(run_conf={"start": "2023-01-01", "end": "2023-01-11", "dry_run": True})
    assert str(getattr(run.state, "value", run.state)) == "success"
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(0,)]
    # nothing written at all: not even the ledger table was created
    assert fetch_all(dst_url, "SELECT to_regclass('backfill_ledger') IS NULL") == [(True,)]


def test_a_missing_pool_fails_the_plan_naming_it_on_airflow_2(example_dag, dst_url, caplog, capsys):
    """Airflow 2.11 (tasks may use the ORM there): the plan task fails at once naming the pool and the command,
    and no chunk runs. Airflow 3 tasks cannot read pools (compat.pool_exists): the plan only logs the command."""
    import yaml

    from airflow_backfill_provider.core.compat import AIRFLOW_V_3
    from airflow_backfill_provider.factory import build_backfill_dag

    if AIRFLOW_V_3:
        pytest.skip("Airflow 3 tasks cannot read pools; see compat.pool_exists")
    spec = yaml.safe_load((REPO / "dags" / "configs" / "orders.yaml").read_text())
    dag = build_backfill_dag({**spec, "name": "orders_no_pool", "pool": "no_such_pool"})
    run = dag.test(run_conf={"start": "2023-01-01", "end": "2023-01-03"})
    out = caplog.text + capsys.readouterr().out
    assert str(getattr(run.state, "value", run.state)) == "failed"
    assert "pool 'no_such_pool' (spec key 'pool') does not exist" in out
    assert 'airflow pools set no_such_pool 4 "source slots for backfills" --include-deferred' in out
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(0,)]
