"""Fixtures of the end-to-end tier: one real Airflow cluster per test module (start-up costs ~15 s)."""

from __future__ import annotations

import pytest

from tests.e2e import orders_env


@pytest.fixture(scope="module")
def orders(databases):
    """Seeded throwaway source and empty destination (with the audit trigger) for the orders DAG."""
    return orders_env.seed(databases.create("e2e_src"), databases.create("e2e_dst"))


@pytest.fixture(scope="module")
def orders_cluster(orders, tmp_path_factory):
    """A real cluster running the example orders DAG against ``orders``; stopped even if tests fail."""
    cluster = orders_env.start_cluster(orders, orders_env.write_dags_folder(tmp_path_factory.mktemp("dags")))
    try:
        yield cluster
    finally:
        cluster.stop()
