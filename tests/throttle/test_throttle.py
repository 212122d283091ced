"""Source protection on a real PostgreSQL: load probe, decisions, the load trigger, pacing."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
import uuid

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core.exceptions import SpecError
from airflow_backfill_provider.core.spec import ThrottleSpec
from airflow_backfill_provider.throttle.probe import (
    LoadSample,
    critical_message,
    decide,
    probe_load,
    reserve_turn,
    timeout_message,
)
from airflow_backfill_provider.triggers.load import SourceLoadTrigger
from tests.load_helpers import Sleepers, count_probes, wait_until
from tests.specs import make_spec


def _now():
    return dt.datetime.now(dt.timezone.utc)


def _sample(active, lag=None, hidden=0):
    return LoadSample(active=active, replica_lag=lag, sampled_at=_now(), hidden=hidden, in_recovery=lag is not None)


# --- probe ----------------------------------------------------------------------------------------


def test_probe_counts_active_sessions_only(src_url, pg):
    conn = psycopg2.connect(src_url)  # not autocommit on purpose: the probe must not leave a transaction open
    try:
        assert probe_load(conn).active == 0
        idle = [pg(src_url) for _ in range(2)]  # idle sessions are not load
        with Sleepers(src_url, 3):
            sample = probe_load(conn)
            assert sample.active == 3, sample
            assert sample.replica_lag is None and not sample.in_recovery  # a primary
            assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
            # our own chunk sessions are the pool's business, not counted as load
            with Sleepers(src_url, 2, application_name="backfill:dag:2024-01-01"):
                assert probe_load(conn).active == 3
                assert probe_load(conn, exclude_application_prefix=None).active == 5
        # re-probing the same connection sees the sleepers gone (no stale stats snapshot)
        assert probe_load(conn).active == 0
        assert len(idle) == 2
    finally:
        conn.close()


def test_probe_inside_an_open_transaction_sees_fresh_figures(src_url):
    conn = psycopg2.connect(src_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")  # the caller's transaction is open
        assert probe_load(conn).active == 0
        with Sleepers(src_url, 2):
            assert probe_load(conn).active == 2  # not the transaction's cached stats snapshot
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS  # left open
    finally:
        conn.close()


def test_probe_is_bounded_by_its_own_timeout_and_restores_the_session_s(src_url, monkeypatch):
    """The probe sends its statements in one round trip: the probe timeout still bounds the probe query
    (set in the same query string, before it), and the session's own statement_timeout is back after it."""
    from airflow_backfill_provider.throttle import probe as throttle

    conn = psycopg2.connect(src_url, options="-c statement_timeout=600000")
    try:
        assert probe_load(conn, timeout_s=0.5).active == 0  # the real query, bounded
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "10min"  # the probe's bound was transaction-local
        conn.rollback()
        # a probe that would take 30 s: cancelled by the server at the probe's 0.5 s, not the session's 10 min
        slow = sql.SQL("SELECT 0, 0, false, NULL::float8, clock_timestamp() FROM pg_sleep(30)")
        monkeypatch.setattr(throttle, "_probe_query", lambda _prefix: slow)
        t0 = time.monotonic()
        with pytest.raises(psycopg2.errors.QueryCanceled):
            probe_load(conn, timeout_s=0.5)
        assert time.monotonic() - t0 < 10
    finally:
        conn.close()


def test_probe_prefix_is_not_a_like_pattern(src_url):
    conn = psycopg2.connect(src_url)
    conn.autocommit = True
    try:
        with Sleepers(src_url, 1, application_name="backfillXdag"):
            # '_' would match 'X' as a LIKE pattern; as a literal prefix it must not
            assert probe_load(conn, exclude_application_prefix="backfill_").active == 1
            assert probe_load(conn, exclude_application_prefix="backfillX").active == 0
    finally:
        conn.close()


def test_probe_reports_sessions_hidden_from_an_unprivileged_user(src_url, pg):
    role = f"bf_probe_{uuid.uuid4().hex[:8]}"
    admin = pg(src_url)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        user_url = src_url.replace("postgres@", f"{role}@", 1)
        conn = psycopg2.connect(user_url)
        conn.autocommit = True
        try:
            with Sleepers(src_url, 2):
                blind = probe_load(conn)
                # the sleepers' state is hidden (so are idle sessions'): none counts as active, all are reported
                assert blind.active == 0 and blind.hidden >= 2, blind
                assert "grant it pg_monitor" in blind.describe()
                with admin.cursor() as cur:
                    cur.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(role)))
                seen = probe_load(conn)
                assert (seen.active, seen.hidden) == (2, 0), seen
                assert "hidden" not in seen.describe()
        finally:
            conn.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# --- decide (pure) --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "active,lag,expected",
    [
        (0, None, "go"),
        (4, None, "go"),  # at the threshold is not over it
        (5, None, "wait"),
        (10, None, "wait"),
        (11, None, "critical"),
        (1, 29.0, "go"),
        (1, 31.0, "wait"),
        (11, 99.0, "critical"),  # critical wins over waiting
    ],
)
def test_decide(active, lag, expected):
    throttle = ThrottleSpec(max_active=4, critical_active=10, max_replica_lag=30)
    assert decide(_sample(active, lag), throttle) == expected


def test_decide_without_optional_thresholds():
    throttle = ThrottleSpec(max_active=4)
    assert decide(_sample(1000), throttle) == "wait"  # no critical_active: never critical
    assert decide(_sample(1, lag=10_000.0), throttle) == "go"  # no max_replica_lag: lag ignored


def test_messages_name_the_figures():
    throttle = ThrottleSpec(max_active=4, critical_active=10, max_wait=60)
    msg = critical_message(_sample(12), throttle)
    assert "12 active sessions" in msg and "critical_active=10" in msg
    msg = timeout_message(_sample(7), throttle, 61.0, None)
    assert "7 active session(s)" in msg and "max_active=4" in msg and "max_wait=60" in msg


def test_throttle_spec_errors_name_the_key():
    with pytest.raises(SpecError, match="critical_active"):
        make_spec(throttle={"max_active": 5, "critical_active": 5})
    with pytest.raises(SpecError, match="poll_max"):
        make_spec(throttle={"poll_interval": 10, "poll_max": 5})
    assert make_spec(throttle={"min_query_interval": 2, "pacing_slots": 4}).throttle.pacing_slots == 4


def test_sample_round_trips_through_json():
    s = _sample(3, lag=1.5, hidden=2)
    assert LoadSample.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# --- trigger (async unit, real database) ----------------------------------------------------------


def _throttle(**kw):
    # the session-count signal only: the latency budget (on by default) is tested in test_load_signal.py
    base = {"max_active": 2, "poll_interval": 0.1, "poll_max": 0.4, "max_wait": 60, "max_latency_ratio": None}
    return ThrottleSpec(**{**base, **kw}).model_dump(mode="json")


def _first_event(trigger):
    return trigger.run().__anext__()


def test_trigger_waits_while_busy_then_fires_ok(src_url):
    trigger = SourceLoadTrigger(conn_id=src_url, throttle=_throttle())

    probes = count_probes(trigger)

    async def scenario(sleepers):
        task = asyncio.ensure_future(_first_event(trigger))
        # the trigger has seen the busy source twice (a probe and a re-probe) and is still waiting
        await wait_until(lambda: len(probes) >= 2 or task.done(), "two probes of the busy source")
        assert not task.done(), f"fired while 3 sessions were active: {task.result()}"
        await asyncio.to_thread(sleepers.end)
        return await asyncio.wait_for(task, timeout=15)

    with Sleepers(src_url, 3) as sleepers:
        event = asyncio.run(scenario(sleepers))
    assert event.payload["status"] == "ok", event.payload
    assert event.payload["sample"]["active"] <= 2
    assert event.payload["waited_s"] > 0  # the wait is reported (how long is timing, not asserted)
    json.dumps(event.payload)  # events travel through the metadata DB


def test_trigger_fires_at_once_when_quiet(src_url):
    event = asyncio.run(asyncio.wait_for(_first_event(SourceLoadTrigger(conn_id=src_url, throttle=_throttle())), 15))
    assert event.payload["status"] == "ok" and event.payload["sample"]["active"] == 0


def test_trigger_times_out_with_figures(src_url):
    trigger = SourceLoadTrigger(conn_id=src_url, throttle=_throttle(max_active=1, max_wait=1.0))
    with Sleepers(src_url, 3):
        t0 = time.monotonic()
        event = asyncio.run(asyncio.wait_for(_first_event(trigger), timeout=20))
        elapsed = time.monotonic() - t0
    p = event.payload
    assert p["status"] == "timeout", p
    assert p["sample"]["active"] == 3
    assert "3 active session(s)" in p["message"] and "max_active=1" in p["message"] and "max_wait=1" in p["message"]
    assert 0.9 <= elapsed < 15


def test_trigger_reports_critical(src_url):
    trigger = SourceLoadTrigger(conn_id=src_url, throttle=_throttle(max_active=1, critical_active=2))
    with Sleepers(src_url, 3):
        event = asyncio.run(asyncio.wait_for(_first_event(trigger), timeout=15))
    assert event.payload["status"] == "critical"
    assert "3 active sessions" in event.payload["message"] and "critical_active=2" in event.payload["message"]


def test_trigger_backoff_doubles_to_poll_max(src_url):
    """Probe times while busy follow poll_interval doubling up to poll_max (generous bounds)."""
    trigger = SourceLoadTrigger(
        conn_id=src_url, throttle=_throttle(max_active=1, poll_interval=0.2, poll_max=0.8, max_wait=3.5)
    )
    seen: list[float] = []
    original = trigger._probe_once

    def recording_probe(kwargs):
        seen.append(time.monotonic())
        return original(kwargs)

    trigger._probe_once = recording_probe
    with Sleepers(src_url, 2):
        event = asyncio.run(asyncio.wait_for(_first_event(trigger), timeout=20))
    assert event.payload["status"] == "timeout"
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    # expected 0.2, 0.4, 0.8, 0.8, ...: never shorter than the schedule, and capped
    assert gaps[0] >= 0.18 and gaps[1] >= 0.38 and gaps[2] >= 0.75, gaps
    assert len(seen) <= 8, gaps  # no tight loop


def test_trigger_serializes_small_json_without_secrets(src_url):
    trigger = SourceLoadTrigger(
        conn_id="prod_pg", throttle=_throttle(), started_at=1700000000.0, not_before=1700000008.0
    )
    classpath, kwargs = trigger.serialize()
    assert kwargs["not_before"] == 1700000008.0  # the triggerer re-creates it with the chunk's floor
    assert classpath == "airflow_backfill_provider.triggers.load.SourceLoadTrigger"
    assert len(json.dumps(kwargs)) < 1000
    again = SourceLoadTrigger(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    with pytest.raises(ValueError, match="password"):
        SourceLoadTrigger(conn_id="postgresql://u:secret@db/x", throttle=_throttle())


def test_trigger_resolves_an_airflow_connection_id(src_url, monkeypatch):
    conn_id = f"bf_src_{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", src_url)
    event = asyncio.run(asyncio.wait_for(_first_event(SourceLoadTrigger(conn_id=conn_id, throttle=_throttle())), 15))
    assert event.payload["status"] == "ok", event.payload
    missing = asyncio.run(
        asyncio.wait_for(_first_event(SourceLoadTrigger(conn_id="no_such_conn_xyz", throttle=_throttle())), 15)
    )
    assert missing.payload["status"] == "error" and "no_such_conn_xyz" in missing.payload["message"]


# --- pacing ---------------------------------------------------------------------------------------


def _reserve(dst_url, **kw):
    conn = psycopg2.connect(dst_url)
    try:
        return reserve_turn(conn, **kw)
    finally:
        conn.close()


def test_pacing_reserves_turns_one_interval_apart(dst_url):
    key = f"pool_{uuid.uuid4().hex[:6]}"
    waits = [_reserve(dst_url, key=key, interval_s=2.0).wait_s for _ in range(3)]
    # back-to-back reservations on one slot: now, +2 s, +4 s (minus the few ms the calls took)
    assert waits[0] == 0
    assert 1.5 <= waits[1] <= 2.0 and 3.5 <= waits[2] <= 4.0, waits
    # two slots: two turns per interval
    key2 = f"pool_{uuid.uuid4().hex[:6]}"
    waits2 = sorted(_reserve(dst_url, key=key2, interval_s=2.0, slots=2).wait_s for _ in range(4))
    assert waits2[0] == 0 and waits2[1] == 0 and all(1.5 <= w <= 2.0 for w in waits2[2:]), waits2


def test_pacing_spaces_real_source_queries(src_url, dst_url):
    """Concurrent 'chunks' reserve, wait their turn, then query the source; source timestamps are spaced."""
    key = f"pool_{uuid.uuid4().hex[:6]}"
    interval = 0.5
    starts: list[dt.datetime] = []
    lock = threading.Lock()

    def chunk():
        turn = _reserve(dst_url, key=key, interval_s=interval, slots=1)
        time.sleep(turn.wait_s)  # stands in for the operator's time-based deferral
        src = psycopg2.connect(src_url)
        try:
            with src.cursor() as cur:
                cur.execute("SELECT clock_timestamp()")
                with lock:
                    starts.append(cur.fetchone()[0])
        finally:
            src.close()

    threads = [threading.Thread(target=chunk) for _ in range(5)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - t0
    starts.sort()
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:])]
    assert len(starts) == 5
    assert all(g >= interval * 0.8 for g in gaps), gaps  # generous lower bound
    assert 4 * interval * 0.8 <= elapsed < 20  # generous upper bound: no runaway waits


def test_pacing_disabled_and_bad_arguments(dst_url):
    assert _reserve(dst_url, key="x", interval_s=0).wait_s == 0
    conn = psycopg2.connect(dst_url)
    conn.autocommit = True
    try:
        with pytest.raises(ValueError, match="non-autocommit"):
            reserve_turn(conn, key="x", interval_s=1)
    finally:
        conn.close()
