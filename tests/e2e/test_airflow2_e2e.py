"""End-to-end on Airflow 2.11: webserver, scheduler, triggerer, LocalExecutor, PostgreSQL."""

import pytest

from tests.e2e import scenarios
from tests.e2e.cluster import airflow_major

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(airflow_major() != 2, reason="Airflow 2.11 end-to-end tier")]


def test_trigger_with_range_via_rest_and_cli(orders_cluster, orders):
    scenarios.trigger_with_range_via_rest_and_cli(orders_cluster, orders)


def test_pool_caps_chunks_on_source(orders_cluster, orders):
    scenarios.pool_caps_chunks_on_source(orders_cluster, orders)


def test_retry_only_the_failed_chunk(orders_cluster, orders):
    """2.11's REST clear takes task ids only: every failed chunk of the run is cleared (here: the one)."""
    scenarios.retry_only_the_failed_chunk(orders_cluster, orders)


def test_dags_backfill_over_10_days(orders_cluster, orders):
    """`airflow dags backfill` (2.11) runs in the foreground with schedule_after_task_execution=False."""
    scenarios.backfill_each_day_once(orders_cluster, orders)
