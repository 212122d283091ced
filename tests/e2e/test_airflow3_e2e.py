"""End-to-end on Airflow 3: api-server, scheduler, dag-processor, triggerer, LocalExecutor, PostgreSQL."""

import pytest

from tests.e2e import scenarios
from tests.e2e.cluster import airflow_major

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(airflow_major() < 3, reason="Airflow 3 end-to-end tier")]


def test_trigger_with_range_via_rest_and_cli(orders_cluster, orders):
    scenarios.trigger_with_range_via_rest_and_cli(orders_cluster, orders)


def test_pool_caps_chunks_on_source(orders_cluster, orders):
    scenarios.pool_caps_chunks_on_source(orders_cluster, orders)


def test_retry_only_the_failed_chunk(orders_cluster, orders):
    scenarios.retry_only_the_failed_chunk(orders_cluster, orders)


def test_backfill_create_over_10_days(orders_cluster, orders):
    """`airflow backfill create` (3.x): the scheduler runs the 10 runs of the unpaused DAG."""
    scenarios.backfill_each_day_once(orders_cluster, orders)


def test_deferred_chunk_resumes_in_its_first_try(orders_cluster, orders):
    scenarios.deferred_chunk_resumes_in_its_first_try(orders_cluster, orders)
