"""A stalled network ends within a stated bound (issue 12 item 10).

A TCP proxy in front of the real server goes silent mid-session: it keeps the sockets open (its kernel
still acknowledges data and keepalive probes) and forwards nothing, like a hung proxy or load balancer.
The stated bounds (CONTRIBUTING.md fault table, docs/faults.md):
- SourceLoadTrigger fires its ``timeout`` event within ``max_wait + EVENT_MARGIN_S``;
- a chunk fails as transient within ``statement_timeout_s + GRACE_S`` of its source going silent, and
  leaves no row, no ledger row, no advisory lock and no open transaction in the destination.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.core.deadlines import GRACE_S
from airflow_backfill_provider.core.exceptions import TransientChunkError
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from airflow_backfill_provider.triggers.load import EVENT_MARGIN_S, SourceLoadTrigger
from tests.session_helpers import SilentProxy, dbname, run_sql, wait_until
from tests.specs import table_spec

#: scheduling slack on a shared 2-core machine, on top of each stated bound
SLACK_S = 3.0


@pytest.fixture()
def proxies():
    made = []

    def _make(**kw):
        made.append(SilentProxy(**kw))
        return made[-1]

    yield _make
    for p in made:
        p.close()


DAY = plan_chunks("2024-01-01", "2024-01-02", "day", "UTC")[0]


def _seed_ev(src_url, dst_url):
    """ev on both sides; ~4 MB of COPY in the source: far more than the proxy lets through or the socket
    buffers between the chunk and a silent proxy hold."""
    ddl = "CREATE TABLE ev (id int PRIMARY KEY, t timestamptz NOT NULL, pad text)"
    run_sql(src_url, ddl)
    run_sql(dst_url, ddl)
    run_sql(
        src_url,
        "INSERT INTO ev SELECT g, '2024-01-01'::timestamptz + g * interval '1 s', repeat('x', 100) "
        "FROM generate_series(1, 40000) g",
    )


def _stalled_chunk(spec, proxy, side: str) -> tuple[dict, float]:
    """One day's chunk in a thread, its ``side`` behind the silent ``proxy``: it must end, transient, naming the
    stall; returns its outcome and the bound (statement timeout + GRACE_S) its duration is held to."""
    outcome: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            outcome["result"] = transfer_chunk(spec, DAY)
        except BaseException as err:  # noqa: BLE001 - inspected below
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - t0

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    bound = spec.statement_timeout_s + GRACE_S
    worker.join(timeout=bound + 20)
    assert not worker.is_alive(), f"the chunk still hangs {bound + 20} s after its {side} went silent"
    assert proxy.silent.is_set(), f"the proxy never went silent: the test did not stall the {side}"
    err = outcome.get("error")
    assert isinstance(err, TransientChunkError), outcome
    assert "no answer" in str(err) and "stalled" in str(err), str(err)
    return outcome, bound


def test_load_trigger_fires_within_max_wait_when_the_probe_hangs(src_url, proxies):
    proxy = proxies(trigger=b"pg_stat_clear_snapshot")  # silent as soon as the probe queries
    max_wait = 2.0
    trigger = SourceLoadTrigger(
        conn_id=proxy.url(dbname(src_url)),
        throttle={"max_active": 1, "max_wait": max_wait, "poll_interval": 0.5, "poll_max": 1.0},
    )

    async def first_event():
        try:
            event = await asyncio.wait_for(trigger.run().__anext__(), timeout=max_wait + EVENT_MARGIN_S + 20)
            return event, time.time() - trigger.started_at
        finally:
            # frees the stuck probe thread now (its own client deadline would, in 15 s), before
            # asyncio.run joins it
            proxy.close()

    event, elapsed = asyncio.run(first_event())
    assert proxy.triggered.is_set()
    assert event.payload["status"] == "timeout", event.payload
    assert "no answer" in event.payload["message"], event.payload["message"]
    assert elapsed <= max_wait + EVENT_MARGIN_S + SLACK_S, elapsed


def test_chunk_whose_source_goes_silent_mid_copy_fails_transient_and_leaves_nothing(src_url, dst_url, proxies):
    _seed_ev(src_url, dst_url)
    proxy = proxies(trigger=b"COPY (", grace_bytes=64 * 1024)
    spec = table_spec(
        proxy.url(dbname(src_url)),
        dst_url,
        "ev",
        time_column="t",
        name="stall",
        statement_timeout_s=1.0,
    )
    outcome, bound = _stalled_chunk(spec, proxy, "source")
    assert outcome["seconds"] <= bound + SLACK_S, outcome["seconds"]

    # nothing left behind in the destination: no row, no ledger row, no session, no advisory lock
    assert run_sql(dst_url, "SELECT count(*) FROM ev") == [(0,)]
    assert run_sql(
        dst_url,
        "SELECT to_regclass('public.backfill_ledger') IS NULL OR NOT EXISTS (SELECT FROM public.backfill_ledger)",
    ) == [(True,)]
    db = dbname(dst_url)
    wait_until(
        lambda: run_sql(
            dst_url,
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'backfill:%%'",
            (db,),
        )[0][0],
        timeout=10,
        what="the chunk's destination session ended",
    )
    assert run_sql(
        dst_url,
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE d.datname = %s AND l.locktype = 'advisory'",
        (db,),
    ) == [(0,)]
    # and the retry, once the network is back, loads the chunk
    retry = transfer_chunk(spec.model_copy(update={"source_conn_id": src_url, "statement_timeout_s": 60}), DAY)
    assert retry.inserted == 40000


@pytest.mark.parametrize(
    "trigger", [b"FROM STDIN", b"ON CONFLICT"], ids=["mid_staging_copy", "after_the_upsert_was_sent"]
)
def test_chunk_whose_destination_goes_silent_fails_transient_and_leaves_nothing(src_url, dst_url, proxies, trigger):
    """The destination behind a hung proxy: while the staging COPY streams into it, or once the upsert
    was sent (its answer never arrives). The chunk's destination session has the spec's statement
    timeout, so its client deadline cuts it; the server, which stops hearing from it, rolls the
    transaction back (statement_timeout, then idle_in_transaction_session_timeout) and frees its locks."""
    _seed_ev(src_url, dst_url)
    proxy = proxies(trigger=trigger)
    spec = table_spec(
        src_url,
        proxy.url(dbname(dst_url)),
        "ev",
        time_column="t",
        name="stall",
        statement_timeout_s=1.0,
    )
    outcome, bound = _stalled_chunk(spec, proxy, "destination")
    # the stall starts a little after the chunk does (catalog reads, the source COPY): bound from the start
    assert outcome["seconds"] <= bound + SLACK_S + 2, outcome["seconds"]

    db = dbname(dst_url)
    if trigger == b"FROM STDIN":
        # PostgreSQL does not act on statement_timeout while a COPY FROM STDIN waits for client data: the
        # server session stays until the network path closes (its transaction is never committed)
        assert run_sql(dst_url, "SELECT count(*) FROM ev") == [(0,)]
        proxy.close()
    # else the proxy stays silent (it never closes the server's socket): the server ends the session itself
    wait_until(
        lambda: run_sql(
            dst_url,
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'backfill:%%'",
            (db,),
        )[0][0],
        timeout=10,
        what="the chunk's destination session ended on the server",
    )
    assert run_sql(dst_url, "SELECT count(*) FROM ev") == [(0,)]
    assert run_sql(
        dst_url,
        "SELECT to_regclass('public.backfill_ledger') IS NULL OR NOT EXISTS (SELECT FROM public.backfill_ledger)",
    ) == [(True,)]
    assert run_sql(
        dst_url,
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE d.datname = %s AND l.locktype = 'advisory'",
        (db,),
    ) == [(0,)]
    retry = transfer_chunk(spec.model_copy(update={"destination_conn_id": dst_url, "statement_timeout_s": 60}), DAY)
    assert retry.inserted == 40000


def test_a_destination_statement_over_the_statement_timeout_fails_transient_naming_the_destination(src_url, dst_url):
    """statement_timeout_s bounds the chunk's destination statements too; a slow upsert (a trigger that
    sleeps) fails the chunk as transient, says it was the destination, and writes nothing."""
    ddl = "CREATE TABLE ev (id int PRIMARY KEY, t timestamptz NOT NULL)"
    run_sql(src_url, ddl)
    run_sql(dst_url, ddl)
    run_sql(
        src_url, "INSERT INTO ev SELECT g, '2024-01-01'::timestamptz + g * interval '1 s' FROM generate_series(1, 3) g"
    )
    run_sql(
        dst_url,
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$;"
        " CREATE TRIGGER slow BEFORE INSERT ON ev FOR EACH ROW EXECUTE FUNCTION slow()",
    )
    spec = table_spec(src_url, dst_url, "ev", time_column="t", name="slowdst", statement_timeout_s=1.5)
    chunk = plan_chunks("2024-01-01", "2024-01-02", "day", "UTC")[0]
    with pytest.raises(TransientChunkError, match=r"statement_timeout \(1.5 s\) hit on the destination"):
        transfer_chunk(spec, chunk)
    assert run_sql(dst_url, "SELECT count(*) FROM ev") == [(0,)]
