"""Pattern B (mode: swap): chunks into <table>_backfill, one atomic, rerunnable merge with live rows present."""

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.prepare.swap import merge_parallel_table
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all, table_digest
from tests import specs

DAYS = plan_chunks("2024-01-01", "2024-01-04", "day", "UTC")


def make_spec(src_url, dst_url, **extra):
    return specs.make_spec(src_url, dst_url, name="orders_swap", mode="swap", **extra)


@pytest.fixture()
def swap_setup(src_url, dst_url, pg):
    """900 source orders over 3 days; live ingest already wrote 3 of them (newer) and 2 brand-new ones."""
    seed_orders(pg(src_url), rows=900, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    pg(dst_url).cursor().execute(
        """INSERT INTO orders (id, customer_id, status, amount, created_at, updated_at)
           VALUES (1, 1, 'live', 9.99, '2024-01-01', now()), (450, 1, 'live', 9.99, '2024-01-02 12:00', now()),
                  (900, 1, 'live', 9.99, '2024-01-03 23:00', now()),
                  (5000, 1, 'live-only', 1.00, now(), now()), (5001, 1, 'live-only', 1.00, now(), now())"""
    )
    # the live rows above are newer than the source's (simulated live ingest): validation's checksum names
    # their days; here a warning, not a failure
    return src_url, dst_url, make_spec(src_url, dst_url, validation={"checksum": "warn"})


def exists(dst, table):
    return fetch_all(dst, "SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0]


def live_rows(dst):
    return fetch_all(dst, "SELECT t::text, xmin::text FROM orders t ORDER BY id")


def test_chunks_load_into_the_parallel_table_only(swap_setup):
    src, dst, spec = swap_setup
    before = live_rows(dst)
    with ThreadPoolExecutor(2) as pool:  # first chunks race to create the parallel table
        results = list(pool.map(lambda c: transfer_chunk(spec, c), DAYS))
    assert sum(r.inserted for r in results) == 900
    assert live_rows(dst) == before  # the live table saw no backfill write
    assert table_digest(src) == table_digest(dst, table="orders_backfill")
    # LIKE ... INCLUDING ALL: same key, so the per-chunk upsert works there
    assert fetch_all(
        dst, "SELECT indexdef LIKE '%UNIQUE%(id)' FROM pg_indexes WHERE tablename = 'orders_backfill'"
    ) == [(True,)]
    ledger = fetch_all(dst, "SELECT DISTINCT target_table FROM backfill_ledger")
    assert ledger == [("public.orders_backfill",)]
    # idempotent per chunk: a rerun rewrites nothing
    xmins = fetch_all(dst, "SELECT id, xmin::text FROM orders_backfill ORDER BY id")
    assert sum(transfer_chunk(spec, c).unchanged for c in DAYS) == 900
    assert fetch_all(dst, "SELECT id, xmin::text FROM orders_backfill ORDER BY id") == xmins


def test_merge_inserts_missing_keys_keeps_live_rows_and_drops_the_parallel_table(swap_setup):
    src, dst, spec = swap_setup
    for c in DAYS:
        transfer_chunk(spec, c)
    live_before = fetch_all(
        dst, "SELECT t::text, xmin::text FROM orders t WHERE id IN (1, 450, 900, 5000, 5001) ORDER BY id"
    )
    result = merge_parallel_table(spec)
    assert result.merged and result.rows_in_parallel == 900
    assert (result.inserted, result.kept_live) == (897, 3)
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(902,)]
    # live rows are untouched, not even rewritten
    assert (
        fetch_all(dst, "SELECT t::text, xmin::text FROM orders t WHERE id IN (1, 450, 900, 5000, 5001) ORDER BY id")
        == live_before
    )
    src_rest = fetch_all(src, "SELECT t::text FROM orders t WHERE id NOT IN (1, 450, 900) ORDER BY id")
    assert (
        fetch_all(dst, "SELECT t::text FROM orders t WHERE id NOT IN (1, 450, 900, 5000, 5001) ORDER BY id") == src_rest
    )
    assert not exists(dst, "public.orders_backfill")
    assert fetch_all(dst, "SELECT count(*) FROM backfill_ledger WHERE target_table = 'public.orders_backfill'") == [
        (0,)
    ]
    # rerunning the merge is a no-op
    again = merge_parallel_table(spec)
    assert not again.merged and fetch_all(dst, "SELECT count(*) FROM orders") == [(902,)]


def test_failed_merge_applies_nothing_and_can_be_rerun(swap_setup, pg):
    src, dst, spec = swap_setup
    for c in DAYS:
        transfer_chunk(spec, c)
    live_before = live_rows(dst)
    parallel_before = table_digest(dst, table="orders_backfill")
    ledger_before = fetch_all(dst, "SELECT chunk_id FROM backfill_ledger ORDER BY chunk_id")
    # the live table rejects one row late in the merge (after hundreds were inserted in the same statement)
    d = pg(dst).cursor()
    d.execute(
        """CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.id = 899 THEN RAISE EXCEPTION 'injected merge failure on id 899'; END IF; RETURN NEW; END $$;
           CREATE TRIGGER boom BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION boom();"""
    )
    with pytest.raises(PermanentChunkError, match="injected merge failure on id 899"):
        merge_parallel_table(spec)
    assert live_rows(dst) == live_before  # nothing half-applied
    assert exists(dst, "public.orders_backfill")
    assert table_digest(dst, table="orders_backfill") == parallel_before
    assert fetch_all(dst, "SELECT chunk_id FROM backfill_ledger ORDER BY chunk_id") == ledger_before
    d.execute("DROP TRIGGER boom ON orders")
    result = merge_parallel_table(spec)
    assert result.merged and result.inserted == 897
    assert not exists(dst, "public.orders_backfill")


def test_merge_refuses_outside_swap_mode(swap_setup):
    src, dst, spec = swap_setup
    with pytest.raises(PermanentChunkError, match="only for mode: swap"):
        merge_parallel_table(load_spec({**spec.model_dump(), "mode": "upsert"}))


def test_swap_dag_under_airflow_merges_after_the_chunks(swap_setup, airflow_db, tmp_path, monkeypatch, pg):
    """factory.build_backfill_dag with mode: swap, run by dag.test(): plan >> load_chunk[] >> merge >> validate."""
    src, dst, spec = swap_setup
    from airflow import settings

    from airflow_backfill_provider.factory import build_backfill_dag

    (tmp_path / "spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    (tmp_path / "swap_dag.py").write_text(
        "import json, pathlib\n"
        "from airflow_backfill_provider.factory import build_backfill_dag\n"
        "dag = build_backfill_dag(json.loads((pathlib.Path(__file__).parent / 'spec.json').read_text()))\n"
    )
    monkeypatch.setattr(settings, "DAGS_FOLDER", str(tmp_path))  # dag.test() on 3.x syncs the dags folder
    dag = build_backfill_dag(spec)
    assert dag.task_dict["merge"].upstream_task_ids == {"load_chunk"} and dag.max_active_runs == 1
    assert dag.task_dict["validate"].upstream_task_ids == {"merge"}  # validation compares the live table
    live_before = live_rows(dst)

    dry = dag.test(run_conf={"start": "2024-01-01", "end": "2024-01-04", "dry_run": True})
    assert str(getattr(dry.state, "value", dry.state)) == "success"
    assert not exists(dst, "public.orders_backfill") and live_rows(dst) == live_before  # dry run: no write

    # the merge fails (the chunks succeed): the run fails and nothing reaches the live table
    d = pg(dst).cursor()
    d.execute(
        """CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'injected merge failure'; END $$;
           CREATE TRIGGER boom BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION boom();"""
    )
    # dry_run given explicitly: dag.test() keeps the previous call's conf in the DAG object's params
    conf = {"start": "2024-01-01", "end": "2024-01-04", "dry_run": False}
    failed = dag.test(run_conf=conf)
    assert str(getattr(failed.state, "value", failed.state)) == "failed"
    states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in failed.get_task_instances()}
    assert states["merge"] == "failed" and states["load_chunk"] == "success"
    assert states["validate"] == "upstream_failed"
    assert live_rows(dst) == live_before and exists(dst, "public.orders_backfill")

    # a new run: every chunk is in the ledger (nothing to load, load_chunk skipped), the merge still runs
    d.execute("DROP TRIGGER boom ON orders")
    run = dag.test(run_conf=conf)
    assert str(getattr(run.state, "value", run.state)) == "success"
    states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in run.get_task_instances()}
    assert states == {"plan": "success", "load_chunk": "skipped", "merge": "success", "validate": "success"}
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(902,)]
    assert not exists(dst, "public.orders_backfill")
    assert fetch_all(dst, "SELECT status FROM orders WHERE id IN (1, 450, 900) ORDER BY id") == [("live",)] * 3
