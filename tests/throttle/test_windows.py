"""Maintenance windows (throttle/windows.py) and waiting out VACUUM/ANALYZE, on real PostgreSQL and the real operator."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time

import pendulum
import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core.compat import TaskDeferred
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.core.exceptions import SpecError
from airflow_backfill_provider.throttle.windows import parse_windows
from tests.conftest import fetch_all
from tests.specs import make_spec, spec_json
from tests.operators.test_throttle_operator import (
    FAST_POLL,
    _chunks,
    _first_event,
    _nothing_written,
    _operator,
    _rebuild,
)

UTC = "UTC"


def _at(text, tz=UTC):
    return pendulum.parse(text, tz=tz)


@pytest.mark.parametrize(
    "allowed, blackout, tz, now, expected",
    [
        ([], [], UTC, "2024-05-01T12:00", None),
        (["22:00-06:00"], [], UTC, "2024-05-01T23:30", None),  # inside, wrapping midnight
        (["22:00-06:00"], [], UTC, "2024-05-01T03:00", None),
        (["22:00-06:00"], [], UTC, "2024-05-01T06:00", "2024-05-01T22:00"),  # end is exclusive
        (["22:00-06:00"], [], UTC, "2024-05-01T12:00", "2024-05-01T22:00"),
        (["22:00-06:00"], ["23:00-23:30"], UTC, "2024-05-01T23:10", "2024-05-01T23:30"),  # blackout wins
        ([], ["2024-12-24T00:00/2024-12-27T00:00"], UTC, "2024-12-25T10:00", "2024-12-27T00:00"),
        (["22:00-06:00"], ["2024-12-24T00:00/2024-12-27T00:00"], UTC, "2024-12-25T10:00", "2024-12-27T00:00"),
        (["01:00:30-01:00:40"], [], UTC, "2024-05-01T01:00:29", "2024-05-01T01:00:30"),  # seconds
        # local wall clock: 22:00 in New York is 02:00 UTC (EDT)
        (["22:00-06:00"], [], "America/New_York", "2024-05-01T12:00", "2024-05-01T22:00"),
        # DST spring forward: 02:00-03:00 does not exist that night; the window opens at 03:00 local
        (["02:30-05:00"], [], "America/New_York", "2024-03-10T01:00", "2024-03-10T03:30"),
    ],
)
def test_next_open(allowed, blackout, tz, now, expected):
    w = parse_windows(allowed, blackout, tz)
    got = w.next_open(_at(now, tz))
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.timestamp() == _at(expected, tz).timestamp(), got


@pytest.mark.parametrize(
    "windows, fragment",
    [
        ({"allowed": ["22-06"]}, "windows.allowed[0]='22-06' is not a daily range"),
        ({"allowed": ["25:00-06:00"]}, "out of range"),
        ({"allowed": ["06:00-06:00"]}, "leave 'allowed' empty"),
        ({"blackout": ["2024-12-27T00:00/2024-12-24T00:00"]}, "the end must be after the start"),
        ({"blackout": ["xmas/new year"]}, "is not a range"),
        ({"timezone": "Mars/Olympus", "allowed": ["22:00-06:00"]}, "not a known IANA timezone"),
        ({"allowd": ["22:00-06:00"]}, "valid keys are: allowed, blackout, timezone, wait_for_maintenance"),
    ],
)
def test_bad_windows_are_refused_naming_the_entry(windows, fragment):
    with pytest.raises(SpecError, match=None) as err:
        make_spec(windows=windows)
    assert fragment in str(err.value)


@pytest.fixture()
def seeded(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=900, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    return src_url, dst_url


def _spec(src, dst, windows=None, **throttle):
    return spec_json(src, dst, throttle=throttle, windows=windows or {})


def test_a_closed_window_defers_and_opens_on_time(seeded):
    src, dst = seeded
    opens = pendulum.now("UTC").add(seconds=3).replace(microsecond=0)
    window = f"{opens.format('HH:mm:ss')}-{opens.add(hours=1).format('HH:mm:ss')}"
    op = _operator(_spec(src, dst, {"allowed": [window], "timezone": "UTC"}, min_defer_s=0), _chunks()[0])
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    assert deferred.value.method_name == "execute_after_window"
    assert _nothing_written(dst)  # no session opened, nothing written before the window
    trigger = _rebuild(deferred.value.trigger)
    event = asyncio.run(asyncio.wait_for(_first_event(trigger), 30))
    assert time.time() >= opens.timestamp()  # fired when the window opened, not before
    result = op.execute_after_window({}, event=event.payload)
    assert result["rows_extracted"] == 300
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(300,)]


def test_a_window_opening_sooner_than_min_defer_s_is_waited_in_the_worker(seeded):
    """The window opens in ~3 s, min_defer_s is 8: the chunk waits in the worker (a deferral's resume that soon
    races the scheduler), then loads, not before the window opens."""
    src, dst = seeded
    opens = pendulum.now("UTC").add(seconds=3).replace(microsecond=0)
    window = f"{opens.format('HH:mm:ss')}-{opens.add(hours=1).format('HH:mm:ss')}"
    op = _operator(_spec(src, dst, {"allowed": [window], "timezone": "UTC"}, min_defer_s=8), _chunks()[0])
    result = op.execute({})  # raises TaskDeferred if it deferred
    assert time.time() >= opens.timestamp()
    assert result["rows_extracted"] == 300


class SlowMaintenance:
    """VACUUM or ANALYZE of the source table kept running by a session-level cost delay (1 page per 100 ms)."""

    def __init__(self, url: str, command: str):
        self.conn = psycopg2.connect(url, application_name="bf-test-maintenance")
        self.conn.autocommit = True
        self.pid = self.conn.get_backend_pid()
        self.url = url
        self.thread = threading.Thread(target=self._run, args=(command,), daemon=True)
        self.thread.start()
        view = "pg_stat_progress_vacuum" if command == "VACUUM" else "pg_stat_progress_analyze"
        admin = psycopg2.connect(url)
        admin.autocommit = True
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with admin.cursor() as cur:
                    cur.execute(
                        sql.SQL("SELECT count(*) FROM {} WHERE pid = %s").format(sql.Identifier(view)), (self.pid,)
                    )
                    if cur.fetchone()[0]:
                        return
                time.sleep(0.05)
            raise AssertionError(f"{command} did not show in {view} within 20 s")
        finally:
            admin.close()

    def _run(self, command):
        try:
            with self.conn.cursor() as cur:
                cur.execute("SET vacuum_cost_delay = 100")
                cur.execute("SET vacuum_cost_limit = 1")
                cur.execute("VACUUM orders" if command == "VACUUM" else "ANALYZE orders")
        except psycopg2.Error:
            pass  # cancelled by end()

    def end(self):
        admin = psycopg2.connect(self.url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_cancel_backend(%s)", (self.pid,))
        admin.close()
        self.thread.join(timeout=30)
        self.conn.close()


@pytest.mark.parametrize("command", ["VACUUM", "ANALYZE"])
def test_a_running_vacuum_or_analyze_makes_a_chunk_wait(src_url, dst_url, pg, command):
    seed_orders(pg(src_url), rows=60000, days=3, start=dt.date(2024, 1, 1))  # ~700 pages: minutes of vacuum
    create_orders(pg(dst_url))
    op = _operator(_spec(src_url, dst_url, **FAST_POLL), _chunks()[0])
    job = SlowMaintenance(src_url, command)
    try:
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({})
        assert deferred.value.method_name == "execute_after_maintenance"
        assert _nothing_written(dst_url)
        trigger = _rebuild(deferred.value.trigger)
        assert trigger.not_before is not None  # the resume floor travels with it (here min_defer_s: 0)

        async def wait_then_end():
            task = asyncio.ensure_future(_first_event(trigger))
            await asyncio.sleep(1.5)
            assert not task.done(), f"trigger fired while {command} was running"
            await asyncio.to_thread(job.end)
            return await asyncio.wait_for(task, timeout=30)

        event = asyncio.run(wait_then_end())
    finally:
        if not job.conn.closed:
            job.end()
    assert event.payload["status"] == "ok"
    result = op.execute_after_maintenance({}, event=event.payload)
    assert result["rows_extracted"] == 20000
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(20000,)]


def test_the_maintenance_trigger_fires_no_sooner_than_its_floor(seeded):
    """Maintenance over at once: the event still waits for not_before (the deferral + throttle.min_defer_s)."""
    from airflow_backfill_provider.core.spec import ThrottleSpec
    from airflow_backfill_provider.triggers.maintenance import MaintenanceTrigger

    src, _ = seeded
    not_before = time.time() + 2.0
    trigger = _rebuild(
        MaintenanceTrigger(
            conn_id=src, table="public.orders", throttle=ThrottleSpec().model_dump(mode="json"), not_before=not_before
        )
    )
    event = asyncio.run(asyncio.wait_for(_first_event(trigger), 30))
    assert event.payload["status"] == "ok" and time.time() >= not_before
