"""Interrupts mid-chunk on real DAG runs: execution_timeout and SIGTERM roll the chunk back and are retried.

Each run is a whole backfill DAG under ``dag.test()`` in its own process (tests/faults/run_dag.py), so the
interrupt is Airflow's own: the SIGALRM of ``execution_timeout`` or a SIGTERM sent to that process. The chunk
is held mid-way by a real slow statement, either on the source (a view that sleeps at one row, so the COPY
is streaming and the staging table already holds rows) or on the destination (a statement trigger on the
upsert that sleeps). Between the interrupted try and its retry the test checks: no session of the chunk
left, no advisory lock held in the destination, no row of the range and no ledger row. Then it lets the
retry run fast and checks the whole run: success on try 2, and the fault suite's invariants.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.seed import seed_orders
from airflow_backfill_provider.connections import application_name
from tests.conftest import REPO
from tests.faults.conftest import DAY1, Invariants, connect, create_destination, make_spec, query, wait_for_copy

pytestmark = pytest.mark.faults

RUN_DAG = Path(__file__).with_name("run_dag.py")
ROWS, SLOW_ID = 60_000, 50_000  # ~3.5 MB of COPY before the slow row: past both 1 MiB pipe buffers
EXECUTION_TIMEOUT_S = 4.0
DEST_SLEEP_S = 6.0  # longer than the timeout: the alarm fires while the upsert statement is still running
RETRY_DELAY_S = 3.0  # room to inspect the destination between the interrupted try and its retry

SOURCE_SLOW = """
CREATE TABLE fault_switch (slow boolean NOT NULL);
INSERT INTO fault_switch VALUES (true);
CREATE VIEW slow_orders AS
    SELECT o.* FROM orders o
    CROSS JOIN LATERAL (SELECT pg_sleep(CASE WHEN o.id = %(slow_id)s AND (SELECT slow FROM fault_switch)
                                             THEN 120 ELSE 0 END)) s
"""
DEST_SLOW = """
CREATE TABLE fault_switch (slow boolean NOT NULL);
INSERT INTO fault_switch VALUES (true);
CREATE FUNCTION slow_upsert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(CASE WHEN (SELECT slow FROM fault_switch) THEN %(sleep)s ELSE 0 END);
    RETURN NULL;
END $$;
CREATE TRIGGER slow_upsert BEFORE INSERT ON orders FOR EACH STATEMENT EXECUTE FUNCTION slow_upsert();
"""


def _world(src_url, dst_url, where: str, name: str):
    seed_orders(connect(src_url), rows=ROWS, days=1, start=DAY1.start.date())
    create_destination(dst_url)
    if where == "source":
        query(src_url, SOURCE_SLOW, {"slow_id": SLOW_ID})
    else:
        query(dst_url, DEST_SLOW, {"sleep": DEST_SLEEP_S})
    spec = make_spec(
        src_url,
        dst_url,
        name=name,
        source_table="slow_orders" if where == "source" else "orders",
        retries=3,
        retry_delay_s=RETRY_DELAY_S,
        validation={"enabled": False},
    )
    return spec


def _start(spec, timeout_s: float, dags_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    conf = {"start": DAY1.start.date().isoformat(), "end": DAY1.end.date().isoformat()}
    # output to a file, not a pipe: nobody reads a pipe while the test holds the chunk, and a full one would
    # block the run's logging (the SIGTERM handler logs a stack) and so its reaction to the signal
    log_path = dags_dir / f"run-{len(list(dags_dir.glob('run-*.log')))}.log"
    with log_path.open("wb") as out:  # the run writes to its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                str(RUN_DAG),
                str(dags_dir),
                json.dumps(spec.model_dump(mode="json")),
                json.dumps(conf),
                str(timeout_s),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def _output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]


def _stacks(proc: subprocess.Popen) -> str:
    """The run's Python stacks, all threads (run_dag.py registers faulthandler on SIGUSR1), for a hang's report."""
    if proc.poll() is not None:
        return f"(the run had ended, exit {proc.returncode})"
    before = len(_output(proc))
    os.kill(proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "File " not in _output(proc)[before:]:
        time.sleep(0.1)
    return _output(proc)[before:]


def _poll(predicate, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def _sessions(url: str, appname: str, extra: str = "") -> int:
    return query(url, f"SELECT count(*) FROM pg_stat_activity WHERE application_name = %s {extra}", (appname,))[0][0]


ADVISORY_LOCKS = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
ADVISORY_LOCK_HOLDERS = (
    "SELECT l.objid, l.mode, a.pid, a.application_name, a.state, left(a.query, 120) FROM pg_locks l "
    "LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def _try_sessions(url: str, appname: str) -> int:
    """The try's sessions and its helpers' (``<appname>:failure``, ``:watch``, ``:probe``)."""
    return query(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s OR application_name LIKE %s",
        (appname, appname.replace("%", r"\%").replace("_", r"\_") + ":%"),
    )[0][0]


def _activity(url: str, appname: str) -> list:
    return query(
        url,
        "SELECT state, wait_event_type, wait_event, now() - query_start, left(query, 200) "
        "FROM pg_stat_activity WHERE application_name = %s",
        (appname,),
    )


def _interrupted_try_left_nothing(inv: Invariants, appname: str, proc: subprocess.Popen) -> None:
    """Once the interrupted try's sessions are gone: nothing of it is left in the destination."""
    try:
        _poll(
            # its helpers' sessions too (`<appname>:failure` records the failure reason, taking the DDL lock)
            lambda: _try_sessions(inv.dst, appname) == 0 and _try_sessions(inv.src, appname) == 0,
            "the interrupted try's sessions to end",
        )
    except AssertionError as err:  # say where the run hangs: its sessions and its threads' stacks
        raise AssertionError(
            f"{err}\nsource sessions: {_activity(inv.src, appname)}\n"
            f"destination sessions: {_activity(inv.dst, appname)}\nthe run's threads:\n{_stacks(proc)}\n"
            f"run output:\n{_output(proc)[-6000:]}"
        ) from None
    # the failure reason is recorded after the try's own sessions closed (a gap with no session): a lock held
    # by it ends with it; a leaked one never does, and fails here after the bound
    try:
        _poll(lambda: query(inv.dst, ADVISORY_LOCKS)[0][0] == 0, "no advisory lock in the destination")
    except AssertionError as err:
        raise AssertionError(f"{err}: {query(inv.dst, ADVISORY_LOCK_HOLDERS)}") from None
    assert query(inv.dst, "SELECT count(*) FROM orders") == [(0,)], "rows of the interrupted try were committed"
    assert inv.ledger_rows(DAY1) == [], "the interrupted try left a ledger row"


def _finish(proc: subprocess.Popen, inv: Invariants) -> tuple[dict, str]:
    for url in (inv.src, inv.dst):  # let the retry run fast (the switch is on the side that was made slow)
        if query(url, "SELECT to_regclass('fault_switch') IS NOT NULL")[0][0]:
            query(url, "UPDATE fault_switch SET slow = false")
    proc.wait(timeout=240)
    out = _output(proc)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"run_dag.py printed no result (exit {proc.returncode}):\n{out[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :]), out


def _retried(spec, inv: Invariants, result: dict, out: str, dags_dir: Path) -> tuple[dict, str]:
    """The interrupted try must be up for retry, then succeed on its retry.

    Airflow 3's dag.test() retries in the same run. Airflow 2.11's dag.test() stops when a task raises a
    BaseException (after recording the task's state): there the state must be up_for_retry, and a new run
    (what the scheduler's retry would do) must succeed.
    """
    if result["escaped"]:
        chunk = _chunk_ti(result)
        assert chunk["state"] == "up_for_retry", (result, out[-4000:])
        proc = _start(spec, 0, dags_dir)
        result, again = _finish(proc, inv)
        return result, out + again
    assert _chunk_ti(result)["try_number"] == 2, result
    return result, out


def _chunk_ti(result: dict) -> dict:
    (ti,) = [t for t in result["tis"] if t["task_id"] == "load_chunk"]
    return ti


def _hold_mid_chunk(where: str, spec, inv: Invariants, appname: str, proc) -> None:
    """Return once the chunk is provably mid-way: source COPY streaming with rows staged, or upsert sleeping."""
    try:
        if where == "source":
            wait_for_copy(inv.dst, appname, min_tuples=1000, done=lambda: proc.poll() is not None, timeout=90)
        _poll(
            lambda: (
                _sessions(inv.src if where == "source" else inv.dst, appname, "AND wait_event = 'PgSleep'")
                or proc.poll() is not None
            ),
            f"the chunk to sleep on the {where}",
        )
        assert proc.poll() is None, "the run ended before the chunk was mid-way"
    except AssertionError as err:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
        raise AssertionError(f"{err}; run output:\n{_output(proc)[-5000:]}") from err


@pytest.mark.parametrize("where", ["source", "destination"])
def test_execution_timeout_mid_chunk_rolls_back_and_is_retried(airflow_db, src_url, dst_url, where, tmp_path):
    spec = _world(src_url, dst_url, where, name=f"timeout_{where}")
    inv = Invariants(src_url, dst_url)
    appname = application_name(spec.effective_dag_id, DAY1.chunk_id)
    proc = _start(spec, EXECUTION_TIMEOUT_S, tmp_path)
    try:
        _hold_mid_chunk(where, spec, inv, appname, proc)
        _interrupted_try_left_nothing(inv, appname, proc)  # the timeout fires by itself
        result, out = _retried(spec, inv, *_finish(proc, inv), tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert result["state"] == "success", out[-4000:]
    assert _chunk_ti(result)["state"] == "success", result
    assert "AirflowTaskTimeout" in out, "the first try did not end with Airflow's timeout"
    assert "permanent error (SQLSTATE" not in out and "errors.QueryCanceled" not in out, "the interrupt became an error"
    inv.check([DAY1])


@pytest.mark.parametrize("where", ["source", "destination"])
def test_sigterm_mid_chunk_rolls_back_and_is_retried(airflow_db, src_url, dst_url, where, tmp_path):
    spec = _world(src_url, dst_url, where, name=f"sigterm_{where}")
    inv = Invariants(src_url, dst_url)
    appname = application_name(spec.effective_dag_id, DAY1.chunk_id)
    proc = _start(spec, 0, tmp_path)  # no execution_timeout: only the SIGTERM stops the slow try
    try:
        _hold_mid_chunk(where, spec, inv, appname, proc)
        os.kill(proc.pid, signal.SIGTERM)
        _interrupted_try_left_nothing(inv, appname, proc)
        result, out = _retried(spec, inv, *_finish(proc, inv), tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert result["state"] == "success", out[-4000:]
    assert _chunk_ti(result)["state"] == "success", result
    assert "ChunkTerminated" in out or "AirflowTaskTerminated" in out, "the first try did not end with the SIGTERM"
    assert "permanent error (SQLSTATE" not in out and "errors.QueryCanceled" not in out, "the interrupt became an error"
    inv.check([DAY1])
