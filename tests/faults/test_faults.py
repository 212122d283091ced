"""Faults, each followed by a retry: nothing lost, nothing duplicated, no newer row overwritten,
the ledger consistent with the data, the live watermark untouched (see conftest.Invariants).
"""

from __future__ import annotations

import json
import threading
import time

import psycopg2
import pytest

from airflow_backfill_provider.prepare import identity
from airflow_backfill_provider.transfer import pipe
from airflow_backfill_provider.core import sql as q
from airflow_backfill_provider.core.chunks import plan_chunks
from tests.seed import seed_orders
from airflow_backfill_provider.core.exceptions import PermanentChunkError, TransientChunkError
from airflow_backfill_provider.connections import application_name
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.faults.conftest import (
    BIG_DAY1_ROWS,
    BIG_DAY2_ROWS,
    DAY1,
    DAY2,
    Invariants,
    add_live_newer_row,
    connect,
    create_destination,
    digest,
    kill,
    make_spec,
    query,
    start_chunk_process,
    wait_for_copy,
    wait_sessions_gone,
)

pytestmark = pytest.mark.faults

LIVE_NEWER_ID = 150_000  # an order in the middle of the big chunk that live ingest already updated


@pytest.fixture()
def big_world(big_src, dst_url):
    """Destination with the small day already loaded and one live-newer row inside the big day."""
    create_destination(dst_url)
    spec = make_spec(big_src, dst_url)
    transfer_chunk(spec, DAY2)
    add_live_newer_row(dst_url, big_src, LIVE_NEWER_ID)
    return spec, Invariants(big_src, dst_url, newer_ids=[LIVE_NEWER_ID])


def assert_nothing_committed(inv: Invariants, chunk, before) -> None:
    """The failed chunk left its range exactly as it was and wrote no ledger row."""
    assert digest(inv.dst, chunk.start, chunk.end) == before, "part of the failed chunk was committed"
    assert inv.ledger_rows(chunk) == [], "a ledger row exists for a chunk that did not commit"


def assert_big_retry(result) -> None:
    assert result.rows_extracted == BIG_DAY1_ROWS
    assert (result.inserted, result.updated, result.unchanged) == (BIG_DAY1_ROWS - 1, 0, 1)  # live-newer row kept


# 1 ---------------------------------------------------------------------------------------------------------
def test_worker_sigkilled_mid_copy_then_retried(big_world):
    spec, inv = big_world
    appname = application_name(spec.effective_dag_id, DAY1.chunk_id)
    before = digest(inv.dst, DAY1.start, DAY1.end)
    proc = start_chunk_process(spec, DAY1)
    try:
        seen = wait_for_copy(inv.dst, appname, min_tuples=2000, done=lambda: proc.poll() is not None)
        kill(proc)
    finally:
        if proc.poll() is None:
            kill(proc)
    assert proc.returncode == -9
    assert 0 < seen < BIG_DAY1_ROWS, "the kill must land mid-COPY"
    # the server notices the dead client on both sides and rolls its transaction back
    wait_sessions_gone(inv.dst, appname)
    wait_sessions_gone(inv.src, appname)
    assert_nothing_committed(inv, DAY1, before)
    assert_big_retry(transfer_chunk(spec, DAY1))
    inv.check([DAY1, DAY2])


# 2 ---------------------------------------------------------------------------------------------------------
def _terminate_source_mid_copy(src_url, dst_url, appname, report: dict) -> None:
    try:
        report["seen"] = wait_for_copy(dst_url, appname, min_tuples=2000)
        # only while the source is still streaming: that is what makes the cut a truncated stream
        report["terminated"] = query(
            src_url,
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database() AND state = 'active' "
            "AND query ILIKE 'COPY%%'",
            (appname,),
        )[0][0]
    except BaseException as err:  # noqa: BLE001 - reported to the test
        report["error"] = err


def _run_with_source_terminated(spec, inv):
    appname = application_name(spec.effective_dag_id, DAY1.chunk_id)
    report: dict = {}
    killer = threading.Thread(target=_terminate_source_mid_copy, args=(inv.src, inv.dst, appname, report))
    killer.start()
    try:
        outcome = transfer_chunk(spec, DAY1)
    except Exception as err:  # noqa: BLE001 - returned for the test to judge
        outcome = err
    killer.join(60)
    assert "error" not in report, report
    assert report.get("terminated") == 1, f"the source COPY was not terminated mid-stream: {report}"
    assert 0 < report["seen"] < BIG_DAY1_ROWS
    return outcome


def test_source_backend_terminated_mid_copy_then_retried(big_world):
    spec, inv = big_world
    before = digest(inv.dst, DAY1.start, DAY1.end)
    err = _run_with_source_terminated(spec, inv)
    assert isinstance(err, TransientChunkError), f"expected a transient error, got {err!r}"
    assert "on the source" in str(err), str(err)
    # raised by the writer check (the source's error), although the destination COPY itself ended cleanly
    cause = err.__cause__
    assert isinstance(cause, psycopg2.Error) and cause.pgcode in (None, "57P01"), repr(cause)
    if cause.cursor is not None:  # psycopg2's "no message from the libpq" DatabaseError names no cursor
        assert f"dbname={inv.src.rsplit('/', 1)[1]} " in cause.cursor.connection.dsn, cause.cursor.connection.dsn
    assert_nothing_committed(inv, DAY1, before)
    assert_big_retry(transfer_chunk(spec, DAY1))
    inv.check([DAY1, DAY2])


def test_source_terminated_mid_copy_reported_without_sqlstate_is_retried(big_world, monkeypatch):
    """Issue 25: psycopg2 can report the same termination as a bare DatabaseError ("error with status
    PGRES_COPY_OUT and no message from the libpq": no SQLSTATE, no cursor), depending on when libpq reads the
    end of the session. The source backend really is terminated mid-COPY; only the driver's way of saying so is
    chosen here. The chunk is transient because the source session is broken, not because of the message."""
    spec, inv = big_world
    before = digest(inv.dst, DAY1.start, DAY1.end)
    original = pipe._Writer.run

    def run_reporting_no_message(self):
        original(self)
        if self.error is not None:
            self.error = psycopg2.DatabaseError("error with status PGRES_COPY_OUT and no message from the libpq")

    monkeypatch.setattr(pipe._Writer, "run", run_reporting_no_message)
    err = _run_with_source_terminated(spec, inv)
    assert isinstance(err, TransientChunkError), f"expected a transient error, got {err!r}"
    assert "on the source" in str(err) and "no message from the libpq" in str(err), str(err)
    assert_nothing_committed(inv, DAY1, before)
    monkeypatch.undo()
    assert_big_retry(transfer_chunk(spec, DAY1))
    inv.check([DAY1, DAY2])


@pytest.fixture()
def first_load_world(big_src, dst_url):
    """An empty destination that indexes its time column: the big day is copied straight into the table
    (transfer/firstload.py), not staged and upserted."""
    create_destination(dst_url)
    conn = connect(dst_url)
    with conn.cursor() as cur:
        cur.execute("CREATE INDEX ON orders (created_at)")
    conn.close()
    return make_spec(big_src, dst_url), Invariants(big_src, dst_url)


def test_worker_sigkilled_mid_first_load_copy_then_retried(first_load_world):
    """The same kill during a COPY straight into the target: the transaction takes it all back."""
    spec, inv = first_load_world
    appname = application_name(spec.effective_dag_id, DAY1.chunk_id)
    before = digest(inv.dst, DAY1.start, DAY1.end)
    proc = start_chunk_process(spec, DAY1)
    try:
        seen = wait_for_copy(inv.dst, appname, min_tuples=2000, done=lambda: proc.poll() is not None)
        # it is the target the COPY writes, not a staging table
        copying = query(
            inv.dst,
            "SELECT p.relid::regclass::text FROM pg_stat_progress_copy p JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = %s AND p.command = 'COPY FROM'",
            (appname,),
        )
        kill(proc)
    finally:
        if proc.poll() is None:
            kill(proc)
    assert proc.returncode == -9 and copying == [("orders",)], copying
    assert 0 < seen < BIG_DAY1_ROWS, "the kill must land mid-COPY"
    wait_sessions_gone(inv.dst, appname)
    wait_sessions_gone(inv.src, appname)
    assert_nothing_committed(inv, DAY1, before)
    assert query(inv.dst, "SELECT count(*) FROM orders") == [(0,)]
    result = transfer_chunk(spec, DAY1)
    assert (result.rows_extracted, result.inserted, result.updated) == (BIG_DAY1_ROWS, BIG_DAY1_ROWS, 0)
    inv.check([DAY1])


def test_source_terminated_mid_first_load_copy_commits_nothing(first_load_world):
    """A source that dies mid-stream can look like a clean EOF to the destination's COPY: also when that COPY
    writes the target itself, the writer check fails the chunk and nothing is committed."""
    spec, inv = first_load_world
    err = _run_with_source_terminated(spec, inv)
    assert isinstance(err, TransientChunkError), f"expected a transient error, got {err!r}"
    assert query(inv.dst, "SELECT count(*) FROM orders") == [(0,)]
    assert inv.ledger_rows(DAY1) == []
    assert transfer_chunk(spec, DAY1).inserted == BIG_DAY1_ROWS
    inv.check([DAY1])


def test_control_without_the_writer_check_a_truncated_stream_would_commit(big_world, monkeypatch):
    """Why stream_copy checks the writer: the destination COPY sees a cut stream as a clean EOF."""
    spec, inv = big_world
    original = pipe._Writer.run

    def forgetful_run(self):
        original(self)
        self.error, self.rows = None, -1  # a naive pipe: ignores how the source side ended

    monkeypatch.setattr(pipe._Writer, "run", forgetful_run)
    _run_with_source_terminated(spec, inv)
    # it committed a partial chunk, and the ledger says the chunk is done: a silent, permanent loss
    ledger = inv.ledger_rows(DAY1)
    assert len(ledger) == 1 and 0 < ledger[0][3] < BIG_DAY1_ROWS, ledger
    assert 0 < digest(inv.dst, DAY1.start, DAY1.end)[0] < BIG_DAY1_ROWS


# 3 ---------------------------------------------------------------------------------------------------------
SMALL_DAYS = plan_chunks("2024-01-01", "2024-01-03", "day", "UTC")
UPDATED = list(range(1001, 1201))  # day 1 orders the source changed after the first load
LIVE_NEWER_SMALL = 1100  # one of them live ingest changed later still, in the destination


@pytest.fixture()
def small_world(src_url, dst_url):
    seed_orders(connect(src_url), rows=4000, days=2, start=SMALL_DAYS[0].start.date())
    create_destination(dst_url)
    spec = make_spec(src_url, dst_url)
    for chunk in SMALL_DAYS:
        transfer_chunk(spec, chunk)
    # live ingest: a newer version in the destination; then the source changes 200 rows (older than that one)
    query(
        dst_url,
        "UPDATE orders SET status = 'live-newer', updated_at = updated_at + interval '1 day' WHERE id = %s",
        (LIVE_NEWER_SMALL,),
    )
    query(
        src_url,
        "UPDATE orders SET status = 'src-newer', updated_at = updated_at + interval '1 hour' WHERE id = ANY (%s)",
        (UPDATED,),
    )
    return spec, Invariants(src_url, dst_url, newer_ids=[LIVE_NEWER_SMALL])


UPDATE_CALLS_BEFORE_FAULT = 149  # the trigger fails on the 150th row update: well into the statement

DEST_FAULTS = {
    # a constraint added on the destination that one changed row violates: retrying cannot help
    "check constraint": (
        "ALTER TABLE orders ADD CONSTRAINT no_poison CHECK (note IS DISTINCT FROM 'poison') NOT VALID",
        "ALTER TABLE orders DROP CONSTRAINT no_poison",
        PermanentChunkError,
        "no_poison",
    ),
    # a trigger raising a plain error mid-upsert: permanent
    "trigger error": (
        """CREATE SEQUENCE boom_calls;
           CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF nextval('boom_calls') = 150 THEN RAISE EXCEPTION 'injected: row % refused', NEW.id; END IF;
           RETURN NEW; END $$;
           CREATE TRIGGER boom BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION boom()""",
        "DROP TRIGGER boom ON orders",
        PermanentChunkError,
        "injected: row .* refused",
    ),
    # a trigger failing with a serialization failure mid-upsert: a retry may succeed
    "trigger serialization_failure": (
        """CREATE SEQUENCE boom_calls;
           CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF nextval('boom_calls') = 150 THEN
               RAISE EXCEPTION 'injected conflict' USING ERRCODE = 'serialization_failure'; END IF;
           RETURN NEW; END $$;
           CREATE TRIGGER boom BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION boom()""",
        "DROP TRIGGER boom ON orders",
        TransientChunkError,
        "40001",
    ),
}


@pytest.mark.parametrize("fault", list(DEST_FAULTS))
def test_destination_fails_mid_upsert_then_retried(small_world, fault):
    spec, inv = small_world
    add, remove, expected, fragment = DEST_FAULTS[fault]
    query(inv.src, "UPDATE orders SET note = 'poison' WHERE id = %s", (max(UPDATED),))
    query(inv.dst, add)
    before = digest(inv.dst, *_span(SMALL_DAYS))
    ledger_before = inv.ledger_rows()
    with pytest.raises(expected, match=fragment):
        transfer_chunk(spec, SMALL_DAYS[0])
    if fault.startswith("trigger"):  # proof the failure came mid-statement, after 149 rows were updated
        assert query(inv.dst, "SELECT last_value FROM boom_calls") == [(UPDATE_CALLS_BEFORE_FAULT + 1,)]
    # nothing half-applied: the rows updated before the failure are rolled back, the ledger row not rewritten
    assert digest(inv.dst, *_span(SMALL_DAYS)) == before
    assert inv.ledger_rows() == ledger_before
    query(inv.dst, remove)
    result = transfer_chunk(spec, SMALL_DAYS[0])
    assert (result.inserted, result.updated, result.unchanged) == (0, len(UPDATED) - 1, 2000 - len(UPDATED) + 1)
    inv.check(SMALL_DAYS)


def _span(chunks):
    return min(c.start for c in chunks), max(c.end for c in chunks)


def test_destination_restarted_mid_chunk_then_retried(big_src, private_pg):
    dst = private_pg.url()
    create_destination(dst)
    spec = make_spec(big_src, dst)
    transfer_chunk(spec, DAY2)
    add_live_newer_row(dst, big_src, LIVE_NEWER_ID)
    inv = Invariants(big_src, dst, newer_ids=[LIVE_NEWER_ID])
    before = digest(dst, DAY1.start, DAY1.end)
    appname = application_name(spec.effective_dag_id, DAY1.chunk_id)
    report: dict = {}

    def restart_mid_copy():
        try:
            report["seen"] = wait_for_copy(dst, appname, min_tuples=2000)
            private_pg.restart()
        except BaseException as err:  # noqa: BLE001 - reported to the test
            report["error"] = err

    restarter = threading.Thread(target=restart_mid_copy)
    restarter.start()
    with pytest.raises(TransientChunkError) as info:
        transfer_chunk(spec, DAY1)
    restarter.join(120)
    assert "error" not in report, report
    assert 0 < report["seen"] < BIG_DAY1_ROWS
    assert "will be retried" in str(info.value)
    # the source session was cancelled, not left streaming into a dead pipe
    wait_sessions_gone(big_src, appname)
    assert_nothing_committed(inv, DAY1, before)
    assert_big_retry(transfer_chunk(spec, DAY1))
    inv.check([DAY1, DAY2])


# 4 ---------------------------------------------------------------------------------------------------------
def test_same_chunk_twice_at_once_is_serialized(big_src, dst_url):
    create_destination(dst_url)
    spec = make_spec(big_src, dst_url, lock_timeout_s=60)  # the second run waits for the first, not fails
    inv = Invariants(big_src, dst_url)
    appname = application_name(spec.effective_dag_id, DAY2.chunk_id)
    # hold the chunk's lock so that both workers are provably inside the same chunk at the same time
    gate = psycopg2.connect(dst_url)
    src = psycopg2.connect(big_src)
    key = identity.of(spec, src, gate).lock_key(DAY2.start, DAY2.end)  # the backfill's own chunk lock
    src.close()
    with gate.cursor() as cur:
        cur.execute(q.advisory_xact_lock(), (key,))
    procs = [start_chunk_process(spec, DAY2) for _ in range(2)]
    try:
        _wait_until(lambda: _waiting_on_advisory_lock(dst_url, appname) == 2, "both workers waiting on the chunk lock")
        gate.commit()  # release: they now race for the lock
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        gate.close()
        for p in procs:
            if p.poll() is None:
                kill(p)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(r["inserted"] for r in results) == [0, BIG_DAY2_ROWS]
    assert sorted(r["unchanged"] for r in results) == [0, BIG_DAY2_ROWS]
    assert len(inv.ledger_rows(DAY2)) == 1
    inv.check([DAY2])


def _waiting_on_advisory_lock(url, appname) -> int:
    return query(
        url,
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = %s",
        (appname,),
    )[0][0]


def _wait_until(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


# 5 ---------------------------------------------------------------------------------------------------------
def test_statement_timeout_on_a_slow_source_is_transient_and_clear(src_url, dst_url):
    seed_orders(connect(src_url), rows=2000, days=1, start=DAY1.start.date())
    # a slow source query: the view sleeps once before returning rows
    query(src_url, "CREATE VIEW slow_orders AS SELECT o.* FROM orders o CROSS JOIN (SELECT pg_sleep(1)) s")
    create_destination(dst_url)
    inv = Invariants(src_url, dst_url)
    spec = make_spec(src_url, dst_url, source_table="slow_orders", statement_timeout_s=0.1)
    with pytest.raises(TransientChunkError) as info:
        transfer_chunk(spec, DAY1)
    message = str(info.value)
    assert "statement_timeout (0.1 s) hit on the source" in message, message
    assert "will be retried" in message and "statement_timeout_s" in message
    assert query(dst_url, "SELECT count(*) FROM orders") == [(0,)]
    assert inv.ledger_rows(DAY1) == []
    # the retry (here with room for the slow query) loads the chunk exactly once
    result = transfer_chunk(spec.model_copy(update={"statement_timeout_s": 30.0}), DAY1)
    assert result.inserted == 2000
    inv.check([DAY1])
