"""The server-wide latency signal (throttle/loadsignal.py) under a real OLTP load: pgbench on a private source server.

The source is a private PostgreSQL cluster (benchmarks/pgcluster.py: initdb into .bench_pg/, own port,
stopped at the end), so the only OLTP load on it is this test's pgbench (small scale, bounded duration).
No timed assertions: every wait polls a condition with a bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import subprocess
import time

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_backfill_provider.core.compat import TaskDeferred
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.core.exceptions import SpecError
from airflow_backfill_provider.throttle.loadsignal import Baseline, LoadWindow, learn_baseline, sample_window
from airflow_backfill_provider.core.spec import ThrottleSpec, load_spec
from airflow_backfill_provider.throttle.probe import LoadSample, decide
from tests.conftest import fetch_all
from tests.load_helpers import Sleepers
from tests.operators.test_throttle_operator import (
    _batch_operator,
    _chunks,
    _first_event,
    _nothing_written,
    _operator,
    _rebuild,
    _spec,
)

#: re-probe fast and resume as soon as the load drops (the resume floor, min_defer_s, is tested in
#: test_throttle_operator.py)
FAST_POLL = {"poll_interval": 0.2, "poll_max": 0.5, "min_defer_s": 0}


@pytest.fixture(scope="module")
def private_source():
    from benchmarks.pgcluster import PrivateCluster

    with PrivateCluster() as pc:
        url = pc.create_database("source")
        conn = psycopg2.connect(url)
        conn.autocommit = True
        seed_orders(conn, rows=900, days=3, start=dt.date(2024, 1, 1))
        conn.close()
        from benchmarks.pgcluster import pg_bin

        subprocess.run([pg_bin("pgbench"), "-i", "-q", "-s", "1", url], check=True, capture_output=True, timeout=120)
        yield url


class PgBench:
    """pgbench -c 4 -j 2 (TPC-B-like, scale 1) on ``url`` for at most ``seconds``, until :meth:`end`."""

    def __init__(self, url: str, seconds: int = 180):
        from benchmarks.pgcluster import pg_bin

        self.url = url
        self.proc = subprocess.Popen(
            [pg_bin("pgbench"), "-n", "-c", "4", "-j", "2", "-T", str(seconds), url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def __enter__(self) -> "PgBench":
        # running once pgbench's four sessions are connected and transactions are committing
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = fetch_all(self.url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'")[0][0]
            if n >= 4:
                return self
            assert self.proc.poll() is None, "pgbench exited early"
            time.sleep(0.1)
        raise AssertionError("pgbench did not connect within 60 s")

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30  # its sessions gone from the server
        while fetch_all(self.url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'")[0][0]:
            assert time.monotonic() < deadline, "pgbench sessions still there 30 s after it ended"
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.end()


@pytest.mark.parametrize("signal", ["latency", "latency_batch", "sessions_only"])
def test_loaded_source_makes_the_chunk_wait_and_it_goes_when_the_load_stops(private_source, dst_url, pg, signal):
    """pgbench's 4 sessions never exceed max_active=8, so the session count alone lets the chunk go
    (the blindness of issue 17); the latency budget makes it wait, and the chunk goes once pgbench ends."""
    src = private_source
    create_orders(pg(dst_url))
    throttle = dict(max_active=8, **FAST_POLL)
    if signal != "sessions_only":
        # a fixed quiet baseline (0.3 ms, the floor) keeps the test independent of what was learned earlier
        throttle.update(max_latency_ratio=3.0, load_window_s=1.0, latency_baseline_ms=0.3)
    if signal == "latency_batch":  # over max_mapped_chunks: the same signal (issue 22: batches ignored it)
        op = _batch_operator(_spec(src, dst_url, **throttle), _chunks(), task_id=f"signal_{signal}")
    else:
        op = _operator(_spec(src, dst_url, **throttle), _chunks()[0], task_id=f"signal_{signal}")
    with PgBench(src) as load:
        if signal == "sessions_only":
            result = op.execute({})  # blind: it reads the source under the load
            assert result["rows_extracted"] == 300
            return
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({})
        assert deferred.value.method_name == "execute_after_wait"
        assert _nothing_written(dst_url)
        trigger = _rebuild(deferred.value.trigger)
        assert trigger.baseline and trigger.baseline["canary_ms"] is not None  # carried, never re-learned
        # a re-probe in the triggerer still sees the load
        sample = trigger._probe_once({"dsn": src})
        assert sample.active <= 4 and sample.latency_ratio > 3.0, sample
        assert decide(sample, ThrottleSpec.model_validate(trigger.throttle)) == "wait"
        load.end()
    event = asyncio.run(asyncio.wait_for(_first_event(trigger), 120))
    assert event.payload["status"] == "ok", event.payload
    ratio = event.payload["sample"]["latency_ratio"]
    assert ratio is None or ratio <= 3.0  # None: too few transactions to measure, no OLTP left to protect
    result = op.execute_after_wait({}, event=event.payload)
    if signal == "latency_batch":
        assert (result["loaded"], result["rows"]) == (3, 900)
        assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(900,)]
        return
    assert result["rows_extracted"] == 300 and result["inserted"] == 300
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(300,)]


class CopyingSession:
    """A session named like one of our chunks, running a COPY out (of a pg_sleep) until :meth:`end`."""

    def __init__(self, url: str, application_name: str):
        import io
        import threading

        self.conn = psycopg2.connect(url, application_name=application_name)
        self.pid = self.conn.get_backend_pid()
        self.url = url
        self.thread = threading.Thread(target=self._copy, args=(io.BytesIO(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not fetch_all(
            url, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (self.pid,)
        )[0][0]:
            assert time.monotonic() < deadline, "COPY session did not start"
            time.sleep(0.05)

    def _copy(self, out):
        try:
            self.conn.cursor().copy_expert("COPY (SELECT pg_sleep(60)) TO STDOUT", out)
        except psycopg2.Error:
            pass  # cancelled by end()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        fetch_all(self.url, "SELECT pg_cancel_backend(%s)", (self.pid,))
        self.thread.join(timeout=10)
        self.conn.close()


def test_window_counts_sessions_server_wide_and_ours_apart(private_source):
    """Sessions in another database count (the whole server is shared); sessions named backfill:* are ours,
    and only those running a COPY are "reading" (another chunk's probe is not)."""
    other = private_source.rpartition("/")[0] + "/postgres"
    with (
        Sleepers(other, 2, application_name="oltp-elsewhere"),
        Sleepers(private_source, 1, application_name="backfill:d:probing"),
        CopyingSession(private_source, "backfill:d:reading"),
    ):
        conn = psycopg2.connect(private_source, application_name="backfill:probe")
        try:
            w = sample_window(conn, window_s=0.3, samples=3)
        finally:
            conn.close()
    assert w.aas >= 2 and w.aas < 3  # the two elsewhere; ours are not OLTP
    assert w.own_active == 1
    assert w.canary_ms > 0


def _window(x, c) -> LoadWindow:
    return LoadWindow(
        canary_ms=c, xact_latency_ms=x, xact_rate=None, aas=0, in_xact=0, io_wal_waits=0, own_active=0, window_s=1
    )


_ms = st.one_of(st.none(), st.floats(min_value=0.01, max_value=500, allow_nan=False))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.tuples(_ms, st.floats(min_value=0.01, max_value=50, allow_nan=False)), min_size=1, max_size=6)
)
def test_learned_baseline_is_the_lowest_seen(dst_url, values):
    key = f"src-{time.time_ns()}"
    conn = psycopg2.connect(dst_url)
    try:
        for x, c in values:
            got = learn_baseline(conn, "public.backfill_load_baseline", key, _window(x, c))
    finally:
        conn.close()
    xs = [x for x, _ in values if x is not None]
    assert got.xact_latency_ms == pytest.approx(min(xs)) if xs else got.xact_latency_ms is None
    assert got.canary_ms == pytest.approx(min(c for _, c in values))


def _sample(ratio, own=0):
    return LoadSample(
        active=0, replica_lag=None, sampled_at=dt.datetime.now(dt.timezone.utc), latency_ratio=ratio, own_active=own
    )


@pytest.mark.parametrize(
    "budget, ratio, own, expected",
    [
        (None, 9.0, 3, "go"),  # signal off: the ratio is only logged
        (2.0, None, 3, "go"),  # not measured
        (2.0, 1.2, 3, "go"),  # under half the budget: the whole pool may read
        (2.0, 1.7, 0, "go"),  # past half, none of ours reading: one may start
        (2.0, 1.7, 1, "wait"),  # past half, one of ours reading: back off to one at a time
        (2.0, 2.0, 0, "go"),  # at the budget
        (2.0, 2.01, 0, "wait"),  # over the budget: nobody starts
        (4.0, 2.4, 2, "go"),  # half of 4.0 is 2.5
        (4.0, 2.6, 2, "wait"),
    ],
)
def test_decide_latency_budget_and_back_off(budget, ratio, own, expected):
    throttle = ThrottleSpec(max_latency_ratio=budget)
    assert decide(_sample(ratio, own), throttle) == expected


def test_sample_round_trips_through_the_trigger_event():
    s = dataclasses.replace(_sample(2.5, 1), window={"xact_latency_ms": 3.0, "canary_ms": 0.1, "baseline": {}})
    assert LoadSample.from_dict(s.to_dict()) == s
    assert "2.50x" in s.describe()


@pytest.mark.parametrize(
    "throttle, key",
    [
        ({"max_latency_ratio": 1.0}, "max_latency_ratio"),
        ({"max_latency_ratio": "fast"}, "max_latency_ratio"),
        ({"load_window_s": 0}, "load_window_s"),
        ({"load_window_s": 120}, "load_window_s"),
        ({"latency_baseline_ms": -1}, "latency_baseline_ms"),
        ({"baseline_table": ""}, "baseline_table"),
    ],
)
def test_bad_latency_settings_name_the_key(throttle, key):
    with pytest.raises(SpecError, match=key):
        load_spec(_spec("postgresql://x/src", "postgresql://x/dst", **throttle) | {"throttle": throttle})


def test_baseline_from_dict_tolerates_missing():
    assert Baseline.from_dict(None) == Baseline()


@pytest.mark.parametrize(
    "xact, canary, base_x, base_c, expected",
    [
        (None, 50.0, 1.0, 0.1, None),  # too few transactions: nothing to protect, whatever the canary says
        (2.0, 50.0, 1.0, 0.1, 2.0),  # the canary is logged, not decided on
        (2.0, 0.1, None, None, 1.0),  # first measurement: it is the baseline
        (0.1, 0.1, 0.05, 0.1, 1.0),  # both under the floor (0.3 ms): noise, not load
        (0.9, 0.1, 0.1, 0.1, 3.0),  # floored baseline: 0.9 / 0.3
    ],
)
def test_latency_ratio(xact, canary, base_x, base_c, expected):
    from airflow_backfill_provider.throttle.loadsignal import latency_ratio

    got = latency_ratio(_window(xact, canary), Baseline(xact_latency_ms=base_x, canary_ms=base_c))
    assert got == (None if expected is None else pytest.approx(expected))


def test_ignore_databases_leaves_airflows_metadata_database_out_of_the_signal(private_source):
    """One server (a laptop, the quick start): Airflow's own sessions are the backfill's machinery, not an
    application to protect; counted, they made the default budget throttle the backfill against itself.
    Named in ``throttle.ignore_databases`` they are left out; another application's session still counts."""
    from airflow_backfill_provider.throttle.loadsignal import measure

    admin = private_source.rpartition("/")[0]
    meta_name = "bf_airflow_meta"
    admin_conn = psycopg2.connect(admin + "/postgres")
    admin_conn.autocommit = True
    with admin_conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {meta_name}")
        cur.execute(f"CREATE DATABASE {meta_name}")
    admin_conn.close()
    conn = psycopg2.connect(private_source, application_name="backfill:probe")
    try:
        with (
            Sleepers(f"{admin}/{meta_name}", 3, application_name=""),  # Airflow's sessions carry no name
            Sleepers(admin + "/postgres", 1, application_name="an-application"),
        ):

            def aas(**throttle) -> float:
                return measure(conn, ThrottleSpec(**throttle), window_s=0.3)["window"]["aas"]

            assert aas() >= 4
            assert 1 <= aas(ignore_databases=[meta_name]) < 2
            assert aas(ignore_databases=["no_such_database"]) >= 4
    finally:
        conn.close()
