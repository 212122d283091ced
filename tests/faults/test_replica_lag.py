"""Replica lag, for real: a backfill reading a streaming standby waits while its replay lags, goes on after.

A private primary, a standby made from it with ``pg_basebackup -R`` on its own port, a writer committing on the
primary all along (the standby's lag is ``now() - pg_last_xact_replay_timestamp()``, so it only falls when a
fresh commit is replayed). Replay is paused with ``pg_wal_replay_pause()``: the lag grows past
``throttle.max_replica_lag``, the chunk waits deferred and reads nothing; ``pg_wal_replay_resume()``: the lag
falls, the chunk loads, exactly, and its ledger row carries the time it waited.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.faults.conftest import DAY1, PG_BIN, PrivateServer, _free_port, create_destination, make_spec, query
from tests.seed import create_orders, seed_orders

pytestmark = pytest.mark.faults

RUN_DAG = Path(__file__).with_name("run_dag.py")
MAX_LAG_S = 2.0


class Standby:
    """A streaming standby of ``primary``: pg_basebackup -R into a temp dir, started on its own port."""

    def __init__(self, primary: PrivateServer):
        self.primary = primary
        self.port = _free_port()
        self.data = primary.dir / "standby"
        self.log = primary.dir / "standby.log"

    def start(self) -> None:
        p = self.primary
        p._run(
            str(PG_BIN / "pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(p.port), "-U", "postgres", "-D", str(self.data), "-R", "-X", "stream"),
        )
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off "
            "-c shared_buffers=16MB -c max_connections=20 -c TimeZone=UTC -c hot_standby=on"
        )
        p._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        try:
            self.primary._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        except Exception:  # noqa: BLE001 - best effort: the primary's stop removes the directory
            pass


def _poll(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def _lag(url: str) -> float:
    return query(url, "SELECT coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0)")[0][
        0
    ]


@pytest.fixture()
def primary_and_standby():
    if not (PG_BIN / "pg_basebackup").exists():
        pytest.fail(f"no pg_basebackup in {PG_BIN} (set BACKFILL_TEST_PG_BIN): the replica-lag test needs it")
    primary = PrivateServer()
    primary.start()
    standby = Standby(primary)
    try:
        standby.start()
        yield primary, standby
    finally:
        standby.stop()
        primary.stop()


def test_chunks_wait_on_replica_lag_and_go_on_when_replay_resumes(airflow_db, primary_and_standby, dst_url, tmp_path):
    primary, standby = primary_and_standby
    import psycopg2

    conn = psycopg2.connect(primary.url())
    conn.autocommit = True
    create_orders(conn)
    seed_orders(conn, rows=400, days=2, start=DAY1.start.date())
    conn.cursor().execute("CREATE TABLE ticks (at timestamptz DEFAULT clock_timestamp())")
    conn.close()
    create_destination(dst_url)
    _poll(lambda: query(standby.url(), "SELECT to_regclass('ticks') IS NOT NULL")[0][0], "the standby replays")

    stop = threading.Event()

    def write():  # a commit every 0.2 s: the standby's lag measures replay, not a quiet primary
        w = psycopg2.connect(primary.url())
        w.autocommit = True
        try:
            while not stop.wait(0.2):
                w.cursor().execute("INSERT INTO ticks DEFAULT VALUES")
        finally:
            w.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    proc = None
    try:
        _poll(lambda: _lag(standby.url()) < MAX_LAG_S / 2, "the standby to catch up")
        query(standby.url(), "SELECT pg_wal_replay_pause()")
        _poll(lambda: _lag(standby.url()) > MAX_LAG_S + 1, "replay lag above max_replica_lag")
        spec = make_spec(
            standby.url(),
            dst_url,
            name="replica_lag",
            throttle={"max_replica_lag": MAX_LAG_S, "poll_interval": 0.5, "poll_max": 1.0, "max_wait": 120},
            validation={"enabled": False},
            retries=0,
        )
        dags = tmp_path / "dags"
        dags.mkdir()
        log_path = tmp_path / "run.log"
        conf = {"start": DAY1.start.date().isoformat(), "end": DAY1.end.date().isoformat()}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(RUN_DAG),
                    str(dags),
                    json.dumps(spec.model_dump(mode="json")),
                    json.dumps(conf),
                    "0",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # the chunk says it waits on the replica's lag, and reads nothing while replay stays paused
        _poll(
            lambda: "max_replica_lag" in log_path.read_text(errors="replace") or proc.poll() is not None,
            "the chunk to wait on the replica lag",
            timeout=120,
        )
        assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
        time.sleep(2.5)  # not a wait for a condition: the chunk must go on waiting while replay stays paused
        assert proc.poll() is None, "the run ended while replay was paused"
        assert query(dst_url, "SELECT count(*) FROM orders")[0][0] == 0
        query(standby.url(), "SELECT pg_wal_replay_resume()")
        proc.wait(timeout=120)
        out = log_path.read_text(errors="replace")
        result = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][len("RESULT ") :])
        assert result["state"] == "success", out[-4000:]
    finally:
        stop.set()
        writer.join(timeout=10)
        if proc is not None and proc.poll() is None:
            proc.kill()
    src_rows = query(
        primary.url(),
        "SELECT count(*) FROM orders WHERE created_at >= %s AND created_at < %s",
        (DAY1.start, DAY1.end),
    )[0][0]
    assert src_rows > 0
    assert query(dst_url, "SELECT count(*) FROM orders")[0][0] == src_rows
    (waited,) = query(dst_url, "SELECT waited_load_s FROM backfill_ledger")[0]
    assert waited is not None and waited >= 1.0, waited
    shutil.rmtree(dags, ignore_errors=True)
