"""The end-to-end scenarios of the orders DAG, written once for both Airflow versions.

Each scenario uses its own date range, so scenarios sharing one cluster and one destination never overlap.
The seed covers 2023-01-01 .. 2023-03-10. Taken: 01-01..01-09 (2a), 01-10..01-18 (2c), 01-20..01-22 (2e),
02-01..02-11 (2b), 03-01..03-05 (2d), 03-06..03-09 (test_ui_trigger.py).
The few version differences (backfill command, what a clear can target) live in tests/e2e/cluster.py.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import warnings

from tests.e2e.cluster import AirflowCluster, max_overlap
from tests.e2e.orders_env import (
    CHUNK_TASK,
    DAG_ID,
    POOL,
    POOL_SLOTS,
    OrdersEnv,
    arrivals_per_day,
    days,
    inject_fault,
    range_digest,
    remove_fault,
    source_rows_per_day,
)

D = dt.date


def assert_loaded_exactly_once(env: OrdersEnv, start: dt.date, end: dt.date) -> None:
    """Destination equals source over [start, end), and every row was committed exactly once."""
    assert range_digest(env.dst_url, start, end) == range_digest(env.src_url, start, end)
    expected = {day: (n, n) for day, n in source_rows_per_day(env, start, end).items()}
    assert len(expected) == (end - start).days
    assert arrivals_per_day(env, start, end) == expected


def chunk_labels(cluster: AirflowCluster, run_id: str) -> list[str]:
    return [t.label for t in cluster.task_instances(DAG_ID, run_id, CHUNK_TASK)]


def trigger_with_range_via_rest_and_cli(cluster: AirflowCluster, env: OrdersEnv) -> None:
    """2a: manual runs with start/end in conf, from the REST API and from the CLI."""
    rest = cluster.trigger(DAG_ID, {"start": "2023-01-01", "end": "2023-01-06"}, via="rest")
    cli = cluster.trigger(DAG_ID, {"start": "2023-01-06", "end": "2023-01-09"}, via="cli")
    assert cluster.wait_for_runs(DAG_ID, [rest, cli]) == {rest: "success", cli: "success"}

    assert chunk_labels(cluster, rest) == [d.isoformat() for d in days(D(2023, 1, 1), D(2023, 1, 6))]
    assert chunk_labels(cluster, cli) == [d.isoformat() for d in days(D(2023, 1, 6), D(2023, 1, 9))]
    assert_loaded_exactly_once(env, D(2023, 1, 1), D(2023, 1, 9))

    # The trigger form's date format is enforced server-side too: a bad date creates no run.
    refusal = cluster.trigger_expect_rejected(DAG_ID, {"start": "2023-02-30", "end": "2023-03-01"})
    assert "2023-02-30" in refusal or "date" in refusal.lower(), refusal


def backfill_each_day_once(cluster: AirflowCluster, env: OrdersEnv) -> None:
    """2b: the backfill command over 10 days: one run per day, each day's rows arrive exactly once."""
    runs = cluster.backfill(DAG_ID, "2023-02-01", "2023-02-10")
    if cluster.backfill_deadlocks:  # a known 2.11 BackfillJob race, worked around by re-running the command
        warnings.warn(f"airflow dags backfill deadlocked {cluster.backfill_deadlocks}x and was re-run", stacklevel=1)
    assert len(runs) == 10, runs
    assert set(cluster.wait_for_runs(DAG_ID, runs, timeout=420).values()) == {"success"}

    per_run = {run: cluster.task_instances(DAG_ID, run, CHUNK_TASK) for run in runs}
    assert sorted(t.label for tis in per_run.values() for t in tis) == [
        d.isoformat() for d in days(D(2023, 2, 1), D(2023, 2, 11))
    ]
    assert all(len(tis) == 1 and tis[0].state == "success" for tis in per_run.values()), per_run
    assert_loaded_exactly_once(env, D(2023, 2, 1), D(2023, 2, 11))

    # the whole backfill from the terminal: Airflow 3's Backfill object, on 2.11 the DAG's backfill-type runs
    out = subprocess.run(
        [sys.executable, "-m", "airflow_backfill_provider", "status", DAG_ID, "--backfill"],
        capture_output=True, text=True, timeout=120, env=cluster.env, cwd=cluster.home,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    label = r"backfill \d+" if cluster.v3 else "backfill-type runs"
    assert re.search(rf"^{DAG_ID}  {label}: 10 run\(s\)  \(success\)$", out.stdout, flags=re.M), out.stdout
    assert "chunks: 10/10 done (100%)" in out.stdout, out.stdout
    listed = re.findall(r"^  \S+  (\S+)  \(success\)  1/1 chunks done$", out.stdout, flags=re.M)
    assert listed == runs, out.stdout  # in logical-date order (runs: sorted by logical date)


def pool_caps_chunks_on_source(cluster: AirflowCluster, env: OrdersEnv) -> None:
    """2c: with more chunks than pool slots, never more than POOL_SLOTS chunks run at once."""
    run = cluster.trigger(DAG_ID, {"start": "2023-01-10", "end": "2023-01-18"})
    assert cluster.wait_for_run(DAG_ID, run) == "success"

    chunks = cluster.task_instances(DAG_ID, run, CHUNK_TASK)
    assert len(chunks) == 8 > POOL_SLOTS
    assert {t.pool for t in chunks} == {POOL}
    assert max_overlap((t.start_date, t.end_date) for t in chunks) <= POOL_SLOTS
    assert_loaded_exactly_once(env, D(2023, 1, 10), D(2023, 1, 18))


def retry_only_the_failed_chunk(cluster: AirflowCluster, env: OrdersEnv) -> None:
    """2d: one chunk fails (fault in the destination), the run fails; clearing that chunk makes it succeed."""
    start, bad, end = D(2023, 3, 1), D(2023, 3, 3), D(2023, 3, 5)
    inject_fault(env, bad)
    try:
        run = cluster.trigger(DAG_ID, {"start": start.isoformat(), "end": end.isoformat()})
        assert cluster.wait_for_run(DAG_ID, run) == "failed"
    finally:
        remove_fault(env)

    first = {t.label: t for t in cluster.task_instances(DAG_ID, run, CHUNK_TASK)}
    assert {label: t.state for label, t in first.items()} == {
        d.isoformat(): ("failed" if d == bad else "success") for d in days(start, end)
    }
    assert bad not in arrivals_per_day(env, start, end)  # the failed chunk committed nothing

    cleared = cluster.clear_failed(DAG_ID, run, CHUNK_TASK, first[bad.isoformat()].map_index)
    assert (CHUNK_TASK, first[bad.isoformat()].map_index if cluster.v3 else None) in cleared
    assert cluster.wait_for_run(DAG_ID, run) == "success"

    after = {t.label: t for t in cluster.task_instances(DAG_ID, run, CHUNK_TASK)}
    assert {label: t.state for label, t in after.items()} == {d.isoformat(): "success" for d in days(start, end)}
    for label, t in after.items():  # only the failed chunk ran again
        if label == bad.isoformat():
            assert t.try_number == first[label].try_number + 1
        else:
            assert (t.try_number, t.start_date) == (first[label].try_number, first[label].start_date)
    assert_loaded_exactly_once(env, start, end)


def deferred_chunk_resumes_in_its_first_try(cluster: AirflowCluster, env: OrdersEnv) -> None:
    """2e: chunks defer on a busy source whose load ends the moment one is deferred; each resumes and succeeds in
    its first try. A resume sooner than the scheduler's processing of the deferral (the worker reports the task
    process's exit up to 5 s later) made Airflow 3.3 fail the re-queued chunk as killed externally: with the
    example's ``retries: 0`` here, a failed run (throttle.min_defer_s prevents it)."""
    from tests.load_helpers import Sleepers

    start, end = D(2023, 1, 20), D(2023, 1, 22)
    with Sleepers(env.src_url, 9, seconds=600) as sleepers:  # the example's throttle.max_active is 8
        run = cluster.trigger(DAG_ID, {"start": start.isoformat(), "end": end.isoformat()})
        cluster.wait_until(
            "a chunk deferred on the busy source",
            lambda: any(t.state == "deferred" for t in cluster.task_instances(DAG_ID, run, CHUNK_TASK)),
            timeout=240,
            interval=0.3,
        )
        sleepers.end()
    assert cluster.wait_for_run(DAG_ID, run) == "success", cluster.task_instances(DAG_ID, run)
    chunks = cluster.task_instances(DAG_ID, run, CHUNK_TASK)
    assert [(t.state, t.try_number) for t in chunks] == [("success", 1)] * (end - start).days, chunks
    assert_loaded_exactly_once(env, start, end)
