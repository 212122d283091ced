"""The chunk operator under source load, on real PostgreSQL: defer and write nothing, resume, fail fast, pace."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import threading
import time

import pendulum
import pytest

from airflow_backfill_provider.plan import batches
from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.core.compat import DAG, AirflowException, AirflowFailException, TaskDeferred
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.operators.chunk import BackfillChunkOperator
from airflow_backfill_provider.core.spec import load_spec
from tests.conftest import fetch_all
from tests.specs import spec_json
from tests.load_helpers import Sleepers, count_probes, wait_until

#: re-probe fast, and resume as soon as the load drops: these tests are about the gate's decisions (the resume
#: floor, throttle.min_defer_s, has its own test below)
FAST_POLL = {"poll_interval": 0.2, "poll_max": 0.5, "min_defer_s": 0}


@pytest.fixture()
def seeded(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=900, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    return src_url, dst_url


def _spec(src, dst, **throttle):
    return spec_json(src, dst, throttle=throttle)


def _operator(spec, chunk, task_id="load_chunk", pool="bf_test_pool"):
    with DAG(dag_id=f"bf_throttle_{task_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)):
        return BackfillChunkOperator(task_id=task_id, spec=spec, chunk=chunk.to_descriptor(), pool=pool)


def _chunks():
    return plan_chunks("2024-01-01", "2024-01-04", "day", "UTC")


def _nothing_written(dst):
    return fetch_all(dst, "SELECT count(*), to_regclass('backfill_ledger') IS NULL FROM orders") == [(0, True)]


def _rebuild(trigger):
    """What the triggerer does: import the classpath and re-create the trigger from its serialized kwargs."""
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _first_event(trigger):
    return trigger.run().__anext__()


def test_busy_source_defers_writes_nothing_then_completes(seeded):
    src, dst = seeded
    chunk = _chunks()[0]
    op = _operator(_spec(src, dst, max_active=2, **FAST_POLL), chunk)
    with Sleepers(src, 3) as sleepers:
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({})
        assert deferred.value.method_name == "execute_after_wait"
        assert _nothing_written(dst)  # deferred before touching the source's table or the destination
        trigger = _rebuild(deferred.value.trigger)

        probes = count_probes(trigger)

        async def wait_then_release():
            task = asyncio.ensure_future(_first_event(trigger))
            # the trigger has seen the busy source twice (a probe and a re-probe) and is still waiting
            await wait_until(lambda: len(probes) >= 2 or task.done(), "two probes of the busy source")
            assert not task.done(), "trigger fired while the source was over max_active"
            await asyncio.to_thread(sleepers.end)
            return await asyncio.wait_for(task, timeout=15)

        event = asyncio.run(wait_then_release())
    assert event.payload["status"] == "ok"
    result = op.execute_after_wait({}, event=event.payload)
    assert result["rows_extracted"] == 300 and result["inserted"] == 300
    assert result["waited_load_s"] > 0  # the wait is reported (how long is timing, not asserted)
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(300,)]
    # and kept in the chunk's ledger row, where the progress page reads it
    near = pytest.approx(result["waited_load_s"], abs=0.051)  # the XCom rounds to 0.1 s
    assert fetch_all(dst, "SELECT waited_load_s, waited_pacing_s FROM backfill_ledger") == [(near, 0.0)]


def test_a_deferred_chunk_resumes_no_sooner_than_min_defer_s(seeded):
    """The load drops right after the chunk deferred: the trigger still fires no sooner than min_defer_s after
    the deferral. Under a real scheduler a faster resume races the executor's report of the deferring process's
    exit, and the scheduler fails the resumed chunk as killed externally (a retry, retry_delay lost)."""
    src, dst = seeded
    floor = 3.0  # the default is 8 s; shorter here to keep the test short
    op = _operator(
        _spec(src, dst, max_active=2, max_latency_ratio=None, poll_interval=0.2, poll_max=0.5, min_defer_s=floor),
        _chunks()[0],
    )
    with Sleepers(src, 3):
        before = time.time()
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({})
        deferred_at = time.time()
    trigger = _rebuild(deferred.value.trigger)  # the source is quiet from here on
    assert before + floor <= trigger.not_before <= deferred_at + floor
    probes = count_probes(trigger)
    event = asyncio.run(asyncio.wait_for(_first_event(trigger), 30))
    fired_at = time.time()
    assert event.payload["status"] == "ok" and event.payload["sample"]["active"] == 0, event.payload
    assert fired_at >= trigger.not_before, f"fired {trigger.not_before - fired_at:.2f} s before the floor"
    assert len(probes) == 1  # timed to end at the floor: no probing of a source it cannot act on yet
    assert op.execute_after_wait({}, event=event.payload)["rows_extracted"] == 300


def _batch_operator(spec, chunks, task_id="load_batch"):
    """One task instance over every chunk (max_mapped_chunks=1, max_batches=1): a batch."""
    spec = {**spec, "max_mapped_chunks": 1, "max_batches": 1}
    (descriptor,) = batches.descriptors(load_spec(spec), chunks, granularity="day")
    with DAG(dag_id=f"bf_throttle_{task_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)):
        return BackfillChunkOperator(task_id=task_id, spec=spec, chunk=descriptor, pool="bf_test_pool")


def test_a_busy_source_defers_a_batch_as_it_defers_a_chunk(seeded):
    """One gate sequence (issue 22): a batch's load trigger counts from the try's start and carries the pacing
    wait back, as a chunk's does; resumed, the batch loads all its chunks and the first ledger row has the wait."""
    src, dst = seeded
    op = _batch_operator(_spec(src, dst, max_active=2, **FAST_POLL), _chunks())
    with Sleepers(src, 3):
        before = time.time()
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({})
        assert deferred.value.method_name == "execute_after_wait"
        assert _nothing_written(dst)
        trigger = _rebuild(deferred.value.trigger)
        assert trigger.carry == {"waited_pacing_s": 0.0} and before <= trigger.started_at <= time.time()
    event = asyncio.run(asyncio.wait_for(_first_event(trigger), 15))
    assert event.payload["status"] == "ok"
    assert op.execute_after_wait({}, event=event.payload) == {
        "batch": op.chunk["chunk_id"],
        "chunks": 3,
        "loaded": 3,
        "rows": 900,
    }
    waits = fetch_all(dst, "SELECT waited_load_s > 0, waited_pacing_s FROM backfill_ledger ORDER BY range_start")
    assert waits == [(True, 0.0), (False, 0.0), (False, 0.0)]


def test_critical_load_fails_at_once_without_retry(seeded):
    src, dst = seeded
    op = _operator(_spec(src, dst, max_active=1, critical_active=2, **FAST_POLL), _chunks()[0])
    with Sleepers(src, 3):
        with pytest.raises(AirflowFailException, match=r"3 active sessions .*critical_active=2"):
            op.execute({})
    assert _nothing_written(dst)


def test_load_turning_critical_while_deferred_fails_without_retry(seeded):
    src, dst = seeded
    op = _operator(_spec(src, dst, max_active=1, critical_active=3, **FAST_POLL), _chunks()[0])
    with Sleepers(src, 2):
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({})
        with Sleepers(src, 2):  # 4 now: over critical_active
            event = asyncio.run(asyncio.wait_for(_first_event(_rebuild(deferred.value.trigger)), 15))
    assert event.payload["status"] == "critical"
    with pytest.raises(AirflowFailException, match="critical_active=3"):
        op.execute_after_wait({}, event=event.payload)
    assert _nothing_written(dst)


def test_wait_timeout_fails_retryably_with_figures(seeded):
    src, dst = seeded
    op = _operator(_spec(src, dst, max_active=1, max_wait=1.0, **FAST_POLL), _chunks()[0])
    with Sleepers(src, 2):
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({})
        event = asyncio.run(asyncio.wait_for(_first_event(_rebuild(deferred.value.trigger)), 15))
    assert event.payload["status"] == "timeout"
    with pytest.raises(AirflowException) as err:
        op.execute_after_wait({}, event=event.payload)
    assert not isinstance(err.value, AirflowFailException)  # a retry later may find a quiet source
    assert "2 active session(s)" in str(err.value) and "max_wait=1" in str(err.value)
    assert _nothing_written(dst)


def test_pacing_defers_the_second_chunk_until_its_turn(seeded):
    src, dst = seeded
    spec = _spec(src, dst, min_query_interval=2.0, pacing_slots=1, min_defer_s=0)
    first, second = _chunks()[:2]
    pool = f"bf_pool_{time.time_ns()}"  # a fresh pacing key
    t0 = time.monotonic()
    assert _operator(spec, first, "a", pool).execute({})["rows_extracted"] == 300  # its turn is now
    op = _operator(spec, second, "b", pool)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    assert deferred.value.method_name == "execute_after_pacing"
    trigger = _rebuild(deferred.value.trigger)
    assert 0.5 <= trigger.at - time.time() <= 2.05
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(300,)]  # the second chunk has not run
    event = asyncio.run(asyncio.wait_for(_first_event(trigger), 15))
    result = op.execute_after_pacing({}, event=event.payload)
    assert time.monotonic() - t0 >= 1.8  # generous: the second source query came at least ~1 interval later
    assert result["rows_extracted"] == 300 and result["waited_pacing_s"] > 0.4
    waits = fetch_all(dst, "SELECT chunk_id, waited_load_s, waited_pacing_s FROM backfill_ledger ORDER BY 1")
    near = pytest.approx(result["waited_pacing_s"], abs=0.051)  # the XCom rounds to 0.1 s
    assert waits == [(first.chunk_id, 0.0, 0.0), (second.chunk_id, 0.0, near)]
    turns = fetch_all(dst, "SELECT count(*) FROM backfill_pacing WHERE pacing_key = %s", (pool,))
    assert turns == [(1,)]  # one slot row per pacing slot


def test_a_pacing_turn_sooner_than_min_defer_s_is_waited_in_the_worker(seeded):
    """A turn 2 s away with min_defer_s 8: no deferral (its resume would race the scheduler), the worker waits
    for the turn, and the wait is in the XCom and the ledger row as a deferred one would be."""
    src, dst = seeded
    spec = _spec(src, dst, min_query_interval=2.0, pacing_slots=1, min_defer_s=8)
    first, second = _chunks()[:2]
    pool = f"bf_pool_{time.time_ns()}"
    assert _operator(spec, first, "a", pool).execute({})["rows_extracted"] == 300
    t0 = time.monotonic()
    result = _operator(spec, second, "b", pool).execute({})  # raises TaskDeferred if it deferred
    assert time.monotonic() - t0 >= 1.0  # its turn came ~2 s after the first chunk's
    assert result["rows_extracted"] == 300 and result["waited_pacing_s"] >= 1.0
    waits = fetch_all(dst, "SELECT chunk_id, waited_pacing_s FROM backfill_ledger ORDER BY 1")
    assert waits == [(first.chunk_id, 0.0), (second.chunk_id, pytest.approx(result["waited_pacing_s"], abs=0.051))]


def test_a_load_arriving_during_a_pacing_wait_in_the_worker_defers_the_chunk(seeded):
    """The load decision taken before a pacing wait is stale after it: the chunk decides again on the load as
    it is then (as a chunk resumed from a pacing deferral does), so a source that became busy during the wait
    defers the chunk before it reads."""
    src, dst = seeded
    spec = _spec(src, dst, min_query_interval=2.0, pacing_slots=1, min_defer_s=8, max_active=2,
                 max_latency_ratio=None, **{k: v for k, v in FAST_POLL.items() if k != "min_defer_s"})  # fmt: skip
    first, second = _chunks()[:2]
    pool = f"bf_pool_{time.time_ns()}"
    assert _operator(spec, first, "a", pool).execute({})["rows_extracted"] == 300
    op = _operator(spec, second, "b", pool)
    real_wait = op._wait_or_defer
    sleepers = []

    def load_arrives_then_wait(*args, **kwargs):  # the real wait, with a busy source from its first moment
        sleepers.append(Sleepers(src, 3, seconds=60))
        return real_wait(*args, **kwargs)

    op._wait_or_defer = load_arrives_then_wait
    try:
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({})
    finally:
        for s in sleepers:
            s.end()
    assert len(sleepers) == 1  # it waited for its turn in the worker (no pacing deferral) ...
    assert deferred.value.method_name == "execute_after_wait"  # ... then deferred on the load seen after it
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(300,)]  # the second chunk read nothing


def test_a_pacing_turn_further_than_min_defer_s_defers(seeded):
    """min_query_interval 12 s, min_defer_s 8: the second chunk's turn is ~12 s away, so it defers."""
    src, dst = seeded
    spec = _spec(src, dst, min_query_interval=12.0, pacing_slots=1, min_defer_s=8)
    first, second = _chunks()[:2]
    pool = f"bf_pool_{time.time_ns()}"
    assert _operator(spec, first, "a", pool).execute({})["rows_extracted"] == 300
    with pytest.raises(TaskDeferred) as deferred:
        _operator(spec, second, "b", pool).execute({})
    assert deferred.value.method_name == "execute_after_pacing"
    assert _rebuild(deferred.value.trigger).at - time.time() >= 8  # never a resume sooner than the floor


def test_dag_test_waits_deferred_until_the_sleepers_end(airflow_db, src_url, dst_url, pg, monkeypatch):
    """Through Airflow itself (dag.test runs triggers in line): chunks load only after the load drops.

    Uses the example DAG (dag.test on 3.x runs DAGs from the dags folder) and opens one more sleeping
    session than its throttle.max_active allows.
    """
    from tests.conftest import REPO

    seed_orders(pg(src_url), rows=600, days=2, start=dt.date(2023, 1, 1))
    create_orders(pg(dst_url))
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_SOURCE_PG", src_url)
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_DEST_PG", dst_url)
    from airflow_backfill_provider.loader import load_backfill_dags

    dag = load_backfill_dags(REPO / "dags" / "configs", strict=True).dags["backfill_orders"]
    max_active = dag.get_task("load_chunk").partial_kwargs["spec"]["throttle"]["max_active"]
    # Instrumentation only (no behaviour change): count the trigger's probes, so the sleepers end
    # once a chunk is really waiting deferred, however long dag.test takes to get there.
    from airflow_backfill_provider.triggers.load import SourceLoadTrigger

    probes_while_busy = threading.Semaphore(0)
    real_probe = SourceLoadTrigger._probe_once

    def counting_probe(self, kwargs):
        sample = real_probe(self, kwargs)
        if sample.active > max_active:
            probes_while_busy.release()
        return sample

    monkeypatch.setattr(SourceLoadTrigger, "_probe_once", counting_probe)
    ended_at: list[dt.datetime] = []
    with Sleepers(src_url, max_active + 1) as sleepers:

        def release():
            # the trigger probed the busy source (at least) once: it is waiting, and nothing was written
            waiting = probes_while_busy.acquire(timeout=120)
            ended_at.append(fetch_all(src_url, "SELECT now()")[0][0])
            written_while_waiting.append(fetch_all(dst_url, "SELECT count(*) FROM orders")[0][0])
            sleepers.end()
            if not waiting:
                ended_at.append(None)

        written_while_waiting: list[int] = []
        releaser = threading.Thread(target=release)
        releaser.start()
        try:
            run = dag.test(run_conf={"start": "2023-01-01", "end": "2023-01-03"})
        finally:
            probes_while_busy.release()  # never leave the releaser blocked
            releaser.join()
    assert None not in ended_at, "no chunk ever deferred to SourceLoadTrigger"
    assert written_while_waiting == [0]
    assert str(getattr(run.state, "value", run.state)) == "success"
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(600,)]
    ((first_finished, n),) = fetch_all(dst_url, "SELECT min(finished_at), count(*) FROM backfill_ledger")
    assert n == 2
    # no chunk wrote while the source was busy
    assert first_finished >= ended_at[0], (first_finished, ended_at)
