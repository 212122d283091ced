"""Scale-out without Docker: CeleryExecutor with Redis, one scheduler and two Celery workers on this machine.

The example orders DAG backfills 14 days (14 chunks) through a pool of 3 slots while the two workers offer
4 task slots, so the pool, not the workers, is the limit. The test checks what scale-out must not break:
destination equals source (whole-table digest, every row committed exactly once), both workers ran chunks
(the task instances' ``hostname``), no more than 3 chunks ever ran at once across the two workers, and after
the cluster stops no process of it is left and its Redis database is flushed.

Needs apache-airflow-providers-celery in the venv and redis-server: a private one on a free port is started for
this module and stopped after it (or E2E_REDIS_URL names an existing Redis); skipped if neither is possible.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import sys
import time

import psutil
import pytest

from tests.e2e import orders_env
from tests.e2e.cluster import CeleryExecutorSetup, airflow_major, celery_missing, max_overlap, redis_server
from tests.e2e.orders_env import CHUNK_TASK, DAG_ID, POOL, SEED_START, days, table_digest
from tests.e2e.scenarios import assert_loaded_exactly_once


def _skip_reason() -> str | None:
    missing = celery_missing()
    if missing:
        return (
            f"CeleryExecutor scale-out test: {', '.join(missing)} not installed in {sys.prefix} "
            "(pins in requirements/airflow-3.3.txt: apache-airflow-providers-celery==3.26.0 celery[redis]==5.6.3)"
        )
    if airflow_major() < 3:
        return "CeleryExecutor scale-out test runs on Airflow 3 only (the version it is verified on)"
    return None


SKIP_REASON = _skip_reason()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

DAYS = 14  # one chunk a day
ROWS = DAYS * 100
POOL_SLOTS = 3
WORKERS, CONCURRENCY = 2, 2  # 4 worker slots > 3 pool slots: the pool must be what caps the chunks
CHUNK_SLEEP_S = 4


@pytest.fixture(scope="module")
def small_orders(databases):
    """A source holding exactly the 14 backfilled days, so the whole tables can be compared.

    100 rows a chunk copy in milliseconds, so chunks would hardly overlap: each upsert sleeps CHUNK_SLEEP_S in
    the destination (the chunk holds its pool slot meanwhile, as a real, slower chunk would).
    """
    env = orders_env.seed(databases.create("celery_src"), databases.create("celery_dst"), rows=ROWS, days=DAYS)
    orders_env.slow_down(env, CHUNK_SLEEP_S)
    return env


@pytest.fixture(scope="module")
def redis_url():
    """A private redis-server for the broker, stopped after the module (or E2E_REDIS_URL)."""
    with redis_server() as (url, reason):
        if reason:
            pytest.skip(reason)
        yield url


def test_two_celery_workers_share_a_backfill_under_one_pool_cap(small_orders, redis_url, tmp_path):
    start, end = SEED_START, SEED_START + dt.timedelta(days=DAYS)
    executor = CeleryExecutorSetup(workers=WORKERS, concurrency=CONCURRENCY, redis_url=redis_url)

    t0 = time.monotonic()
    cluster = orders_env.start_cluster(
        small_orders, orders_env.write_dags_folder(tmp_path / "dags"), executor=executor, pool_slots=POOL_SLOTS
    )
    redis_db = executor.db
    try:
        workers = set(executor.hostnames(cluster))
        t_run = time.monotonic()
        run = cluster.trigger(DAG_ID, {"start": start.isoformat(), "end": end.isoformat()})
        assert cluster.wait_for_run(DAG_ID, run, timeout=600) == "success"
        run_s = time.monotonic() - t_run
        every_ti = cluster.task_instances(DAG_ID, run)
        chunks = [t for t in every_ti if t.task_id == CHUNK_TASK]
        running = []
        for pid in cluster.pids():
            with contextlib.suppress(psutil.NoSuchProcess):  # a process may end between listing and lookup
                running.append(psutil.Process(pid))
        # api-server, scheduler, dag-processor, triggerer, and each worker with its CONCURRENCY pool processes
        assert len(running) >= 4 + WORKERS * (1 + CONCURRENCY), running
    finally:
        cluster.stop()
    # Every process is gone (is_running() compares creation times, so a recycled pid does not count).
    assert [p for p in running if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert cluster.pids() == set()  # nothing else with this cluster's AIRFLOW_HOME either

    per_worker = collections.Counter(t.hostname for t in chunks)
    peak = max_overlap((t.start_date, t.end_date) for t in chunks)
    print(
        f"\ncelery scale-out: {len(chunks)} chunks in {run_s:.1f}s (cluster up in {cluster.timings['start_total']:.1f}s, "
        f"total {time.monotonic() - t0:.1f}s); per worker {dict(per_worker)}; max concurrent chunks {peak}; "
        f"redis db {redis_db}"
    )

    # Every chunk ran once, in the source's pool.
    assert sorted(t.label for t in chunks) == [d.isoformat() for d in days(start, end)]
    assert {(t.state, t.try_number, t.pool) for t in chunks} == {("success", 1, POOL)}
    # Every task of the run (plan, chunks, validation) ran on one of the two workers, and both ran chunks.
    assert {t.hostname for t in every_ti} <= workers, {t.hostname for t in every_ti}
    assert set(per_worker) == workers, per_worker
    # The pool caps chunks across workers: never more than 3 at once although the workers had 4 slots,
    # and the cap was reached (otherwise this run would not show that it holds).
    assert peak == POOL_SLOTS, f"max concurrent chunks {peak}, pool has {POOL_SLOTS} slots"
    # Destination equals source, every row committed exactly once.
    assert table_digest(small_orders.dst_url) == table_digest(small_orders.src_url)
    assert table_digest(small_orders.src_url)[0] == ROWS
    assert_loaded_exactly_once(small_orders, start, end)
    # Nothing of this run left in Redis (its queue and claim are gone; the db may be someone else's by now).
    import redis

    with redis.Redis.from_url(f"{redis_url}/{redis_db}") as client:
        assert client.keys(f"*{cluster.tag}*") == []
        assert client.get(CeleryExecutorSetup.CLAIM_KEY) != cluster.tag.encode()
