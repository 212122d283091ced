"""Throttle inside a chunk (issue 23): while a chunk reads, the source's load pauses the read (the COPY pipe
is not drained, so the source backend waits on its socket), and it resumes when the load goes away.

The load is real: sessions running pg_sleep on the source database raise its active-session count over
``throttle.max_active`` (tests/load_helpers.py). The chunk is large enough (tens of MB) that a paused read
reaches the source: its backend then waits in ``ClientWrite``.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import time

import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.core.interrupts import ChunkTerminated
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all, table_digest
from tests.load_helpers import Sleepers
from tests.seed import create_orders, seed_orders
from tests.specs import make_spec

ROWS = 300_000
CHUNK = plan_chunks("2024-01-01", "2024-01-02", "day", "UTC")[0]
#: rows a blocked source may still send while paused: TCP receive buffers compact and grow a little under a
#: zero window (a few hundred rows in a second were seen); unpaused, it sends tens of thousands per second
TRICKLE = 2000
#: sleepers > max_active: the source is "busy" for the watch
MAX_ACTIVE = 2
SLEEPERS = 3


@pytest.fixture(scope="module")
def source(databases):
    import psycopg2

    url = databases.create("rwsrc")
    conn = psycopg2.connect(url)
    try:
        seed_orders(conn, rows=ROWS, days=1, start=dt.date(2024, 1, 1))
        with conn.cursor() as cur:  # wide rows: the chunk is far larger than the pipe's and sockets' buffers
            cur.execute("UPDATE orders SET note = repeat(md5(id::text), 4)")
        conn.commit()
    finally:
        conn.close()
    return url


@pytest.fixture()
def dst(dst_url, pg):
    create_orders(pg(dst_url))
    return dst_url


def spec_for(src, dst, **throttle):
    """The read watch on: busy above MAX_ACTIVE, checked every 0.1 s while reading."""
    watch = {"max_active": MAX_ACTIVE, "max_latency_ratio": None, "read_check_s": 0.1, "max_pause_s": 120}
    return make_spec(src, dst, throttle={**watch, **throttle})


def wait_for(what: str, condition, timeout: float = 30.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(every)


def source_blocked_on_socket(src) -> bool:
    """The chunk's COPY on the source waits to write to its client: the paused read has reached the source."""
    return fetch_all(
        src,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'backfill:%%' AND query LIKE 'COPY%%TO STDOUT%%' AND wait_event = 'ClientWrite'",
    ) == [(1,)]


def source_rows_sent(src) -> int | None:
    """Rows the chunk's COPY has produced on the source so far (pg_stat_progress_copy, PostgreSQL 14+)."""
    rows = fetch_all(
        src,
        "SELECT p.tuples_processed FROM pg_stat_progress_copy p JOIN pg_stat_activity a USING (pid) "
        "WHERE p.datname = current_database() AND p.command = 'COPY TO' AND a.application_name LIKE 'backfill:%%'",
    )
    return rows[0][0] if rows else None


def stays_still(src, seconds: float) -> tuple[int | None, int | None]:
    """The source COPY's row count now and after ``seconds`` (the pause's duration, not a wait for a condition)."""
    before = source_rows_sent(src)
    time.sleep(seconds)
    return before, source_rows_sent(src)


def source_stopped(src) -> bool:
    """The source's COPY is blocked on its socket and sent no row for 0.3 s: the paused read has filled the
    pipe's and the sockets' buffers (a moment after the pause began, the source still fills them)."""
    if not source_blocked_on_socket(src):
        return False
    before, after = stays_still(src, 0.3)
    return before is not None and after is not None and after - before <= TRICKLE


def our_sessions(url) -> int:
    return fetch_all(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'backfill:%%'",
    )[0][0]


def logged(caplog, text: str) -> bool:
    return any(text in r.getMessage() for r in list(caplog.records))


class Background:
    """transfer_chunk in a thread, its result or error kept."""

    def __init__(self, spec):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(spec,), daemon=True)
        self.thread.start()

    def _run(self, spec):
        try:
            self.result = transfer_chunk(spec, CHUNK)
        except BaseException as err:  # noqa: BLE001 - asserted by the test
            self.error = err


def test_a_read_pauses_while_the_source_is_busy_and_resumes_when_the_load_goes_away(source, dst, caplog):
    caplog.set_level(logging.INFO, logger="airflow_backfill_provider")
    spec = spec_for(source, dst)
    held_s = 1.5
    with Sleepers(source, SLEEPERS) as load:
        chunk = Background(spec)
        wait_for("the watch paused the read", lambda: logged(caplog, "read paused"))
        wait_for("the source's COPY stopped on its socket", lambda: source_stopped(source))
        before, after = stays_still(source, held_s)  # the load lasts held_s more; the source does no work meanwhile
        assert before is not None and after is not None and after - before <= TRICKLE and after < ROWS, (
            f"the source's COPY went on: {before} -> {after} rows"
        )
        assert chunk.thread.is_alive(), "the chunk ended while the source was busy: its read was not paused"
        assert source_blocked_on_socket(source)
        load.end()
        ended_load = time.monotonic()
        chunk.thread.join(60)
    assert not chunk.thread.is_alive()
    assert chunk.error is None, chunk.error
    resumed_after = time.monotonic() - ended_load
    result = chunk.result
    assert result.read_pauses >= 1
    assert result.paused_s >= held_s  # paused at least while the test held the load
    assert logged(caplog, "read resumed")
    assert not logged(caplog, "the limit"), "resumed by the load going away, not by a bound"
    assert resumed_after < 30
    assert result.rows_extracted == ROWS
    assert table_digest(source) == table_digest(dst)  # the chunk's data is exact
    # the pause is a wait for the load: the ledger's waited_load_s counts it
    (waited,) = fetch_all(dst, "SELECT waited_load_s FROM backfill_ledger")[0]
    assert waited == pytest.approx(result.paused_s, abs=0.01)
    assert logged(caplog, f"read paused {result.read_pauses} time(s), {result.paused_s:.1f} s in all")
    wait_for("no session of ours left on the source", lambda: our_sessions(source) == 0, timeout=10)


@pytest.mark.parametrize(
    "extra, low, high, bound",
    [
        # the pause itself lasts max_pause_s
        ({"max_pause_s": 1.0}, 1.0, 1.5, "throttle.max_pause_s=1"),
        # a paused COPY still runs: pauses end half of statement_timeout_s after the read began (it read a
        # moment before the first check paused it), and the statement is not cancelled
        ({"max_pause_s": 120, "statement_timeout_s": 10.0}, 4.0, 5.0, "half of statement_timeout_s"),
    ],
)
def test_a_pause_is_bounded_and_the_chunk_then_reads_to_its_end(source, dst, caplog, extra, low, high, bound):
    caplog.set_level(logging.INFO, logger="airflow_backfill_provider")
    timeout = extra.pop("statement_timeout_s", None)
    spec = spec_for(source, dst, **extra)
    if timeout is not None:
        spec = spec.model_copy(update={"statement_timeout_s": timeout})
    with Sleepers(source, SLEEPERS):  # busy for the whole chunk
        result = transfer_chunk(spec, CHUNK)
    assert result.read_pauses >= 1
    assert low <= result.paused_s <= high
    assert logged(caplog, f"pauses ended by {bound}")
    assert result.rows_extracted == ROWS
    assert table_digest(source) == table_digest(dst)


def test_an_interrupt_during_a_pause_ends_the_chunk_promptly_and_leaves_no_session(source, dst, caplog):
    caplog.set_level(logging.INFO, logger="airflow_backfill_provider")
    spec = spec_for(source, dst)
    sent: list[float] = []
    held: list[tuple] = []

    def terminate():  # like the worker's SIGTERM, once the read is paused and the source blocked
        wait_for("the watch paused the read", lambda: logged(caplog, "read paused"))
        wait_for("the source's COPY stopped on its socket", lambda: source_stopped(source))
        held.append(stays_still(source, 0.5))  # paused: the source produces no rows meanwhile
        sent.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    def handler(signum, frame):
        raise ChunkTerminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with Sleepers(source, SLEEPERS):
            helper = threading.Thread(target=terminate, daemon=True)
            helper.start()
            with pytest.raises(ChunkTerminated):
                transfer_chunk(spec, CHUNK)
            ended = time.monotonic()
            helper.join(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sent, "the helper never saw the pause"
    before, after = held[0]
    assert before is not None and after is not None and after - before <= TRICKLE and after < ROWS, (
        f"not paused when signalled: {before} -> {after} rows"
    )
    assert ended - sent[0] < 5, f"the chunk took {ended - sent[0]:.1f} s to end after SIGTERM"
    wait_for("no session of ours left on the source", lambda: our_sessions(source) == 0, timeout=10)
    wait_for("no session of ours left on the destination", lambda: our_sessions(dst) == 0, timeout=10)
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(0,)]  # rolled back
