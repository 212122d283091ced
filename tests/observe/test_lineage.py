"""OpenLineage facets of the chunk, live and merge operators, after a real chunk load on PostgreSQL.

Needs apache-airflow-providers-openlineage (installed in the 3.3 venv); the end-to-end module checks the
events its listener emits on a real cluster. Without the provider, the operators still load chunks.
"""

from __future__ import annotations

import datetime as dt

import pendulum
import pytest
from psycopg2.extensions import parse_dsn

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.core.compat import DAG
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.operators.chunk import BackfillChunkOperator
from airflow_backfill_provider.operators.live import LiveIngestOperator
from airflow_backfill_provider.operators.merge import MergeBackfillOperator
from tests.conftest import fetch_all
from tests.specs import spec_json


@pytest.fixture()
def loaded(src_url, dst_url, pg):
    """One day chunk loaded by the operator, as a mapped instance would (execute on a real context)."""
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    chunk = plan_chunks("2024-01-01", "2024-01-02", "day", "UTC")[0]
    with DAG(dag_id="bf_lineage", schedule=None, start_date=pendulum.datetime(2024, 1, 1)):
        op = BackfillChunkOperator(task_id="load_chunk", spec=spec_json(src_url, dst_url), chunk=chunk.to_descriptor())
    op.execute({"dag_run": None})
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(100,)]
    return op


def _names(url):
    p = parse_dsn(url)
    return f"postgres://{p.get('host', 'localhost')}:{p.get('port', 5432)}", p["dbname"]


def test_chunk_lineage_names_tables_with_schema_and_row_count(loaded, src_url, dst_url):
    pytest.importorskip("airflow.providers.openlineage")
    start = loaded.get_openlineage_facets_on_start()
    done = loaded.get_openlineage_facets_on_complete(None)
    (inp,), (out,) = done.inputs, done.outputs
    ns, src_db = _names(src_url)
    assert (inp.namespace, inp.name) == (ns, f"{src_db}.public.orders")
    assert (out.namespace, out.name) == (_names(dst_url)[0], f"{_names(dst_url)[1]}.public.orders")
    assert [(f.name, f.type) for f in out.facets["schema"].fields][:5] == [
        ("id", "bigint"), ("customer_id", "integer"), ("status", "text"), ("amount", "numeric(12,2)"),
        ("created_at", "timestamp with time zone"),
    ]  # fmt: skip
    assert {f.name for f in inp.facets["schema"].fields} >= {"id", "created_at", "updated_at", "amount"}
    assert out.outputFacets["outputStatistics"].rowCount == 100
    assert start.outputs[0].outputFacets == {}  # no row count before the load
    assert loaded.get_openlineage_facets_on_failure(None).inputs[0].name == inp.name


def test_live_and_merge_lineage(src_url, dst_url, pg):
    pytest.importorskip("airflow.providers.openlineage")
    seed_orders(pg(src_url), rows=10, days=1, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    with DAG(dag_id="bf_lineage_2", schedule=None, start_date=pendulum.datetime(2024, 1, 1)):
        live = LiveIngestOperator(task_id="live", spec=spec_json(src_url, dst_url, live={"enabled": True}))
        merge = MergeBackfillOperator(task_id="merge", spec=spec_json(src_url, dst_url, mode="swap"))
    ns_dst, dst_db = _names(dst_url)
    lin = live.get_openlineage_facets_on_start()
    assert [d.name for d in lin.inputs] == [f"{_names(src_url)[1]}.public.orders"]
    assert [d.name for d in lin.outputs] == [f"{dst_db}.public.orders"]
    lin = merge.get_openlineage_facets_on_start()  # the parallel table does not exist: no schema, no error
    assert [(d.namespace, d.name) for d in lin.inputs] == [(ns_dst, f"{dst_db}.public.orders_backfill")]
    assert "schema" not in lin.inputs[0].facets and "schema" in lin.outputs[0].facets
    assert [d.name for d in lin.outputs] == [f"{dst_db}.public.orders"]


def test_lineage_never_fails_a_task(loaded, monkeypatch):
    pytest.importorskip("airflow.providers.openlineage")
    monkeypatch.setattr(loaded, "spec", {**loaded.spec, "source_conn_id": "no_such_connection"})
    lin = loaded.get_openlineage_facets_on_complete(None)
    assert lin.inputs == [] and lin.outputs == []


def test_the_chunk_loads_with_or_without_the_openlineage_provider(loaded):
    """Nothing of OpenLineage is imported by loading a chunk (2.11's venv has no OpenLineage provider)."""
    assert loaded._lineage_rows == 100
