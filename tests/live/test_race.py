"""Backfill, live ingest and a busy source writer at the same time: the destination ends as the source's latest.

The random test runs 3 times (parametrized); two deterministic tests pin the two subtle interleavings:
a chunk holding an OLDER version staged while live ingest commits the newer one, and a source write that
commits after live ingest already moved its watermark past the row's timestamp.
"""

import datetime as dt
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core.chunks import plan_chunks
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.core.exceptions import TransientChunkError
from airflow_backfill_provider.live import run_live_ingest
from airflow_backfill_provider.plan.planning import build_plan
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all
from tests import specs

ROWS, DAYS, START = 1200, 2, dt.date(2024, 1, 1)
BOUND_S = 30  # generous: a round takes a few seconds
ROUNDS = int(os.environ.get("RACE_ROUNDS", "3"))  # CI can ask for more, e.g. RACE_ROUNDS=10


def make_spec(src_url, dst_url, lookback_s=5):
    """Hourly chunks beside live ingest; nothing in a round may hang: statements and locks bounded in time."""
    live = {"enabled": True, "lookback_s": lookback_s}
    return specs.make_spec(src_url, dst_url, granularity="hour", live=live, statement_timeout_s=20, lock_timeout_s=5)


@pytest.fixture()
def seeded(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=ROWS, days=DAYS, start=START)
    create_orders(pg(dst_url))
    return src_url, dst_url


def with_retries(fn, *args, counter=None, attempts=20):
    """What Airflow's task retries do: a transient failure (deadlock, lock timeout) runs the task again."""
    for attempt in range(attempts):
        try:
            return fn(*args)
        except TransientChunkError as err:
            if counter is not None:
                counter.append(str(err).split(":", 2)[-1].strip()[:80])
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def rows(url):
    return fetch_all(url, "SELECT id, t::text FROM orders t ORDER BY id")


def assert_converged(src, dst):
    s, d = rows(src), rows(dst)
    assert len(d) == len({k for k, _ in d}), "duplicate keys in the destination"
    missing = {k for k, _ in s} - {k for k, _ in d}
    extra = {k for k, _ in d} - {k for k, _ in s}
    assert not missing and not extra, f"missing keys {sorted(missing)[:10]}, extra keys {sorted(extra)[:10]}"
    stale = [(a, b) for a, b in zip(s, d) if a != b]
    assert not stale, (
        f"{len(stale)} keys differ from the source's latest version, e.g. source {stale[0][0]} vs destination {stale[0][1]}"
    )


class Writer(threading.Thread):
    """The application: keeps updating random rows and inserting new ones inside the backfill's range."""

    #: a fixed budget, not a duration: a slow machine must not make the round's work grow with its time
    MAX_ROUNDS = 1200

    def __init__(self, url, seed):
        super().__init__(daemon=True, name="source-writer")
        self.url, self.rng = url, random.Random(seed)
        self.stop = threading.Event()
        self.updates = self.inserts = 0
        self.error = None

    def run(self):
        try:
            conn = psycopg2.connect(self.url)
            conn.autocommit = True
            cur = conn.cursor()
            next_id = ROWS + 1
            # mostly keys never touched before (an overwrite by an older version would then never be repaired
            # by a later update, so a lost update shows), plus one random key per round (hot rows)
            fresh = list(range(1, ROWS + 1))
            self.rng.shuffle(fresh)
            for _ in range(self.MAX_ROUNDS):
                if self.stop.is_set():
                    break
                ids = [fresh.pop() for _ in range(min(2, len(fresh)))] + [self.rng.randrange(1, next_id)]
                cur.execute(
                    "UPDATE orders SET status = 'w' || %s, amount = amount + 1,"
                    " updated_at = greatest(clock_timestamp(), updated_at + interval '1 microsecond') WHERE id = ANY(%s)",
                    (self.updates, ids),
                )
                self.updates += cur.rowcount
                created = dt.datetime.combine(START, dt.time(), dt.timezone.utc) + dt.timedelta(
                    seconds=self.rng.uniform(0, DAYS * 86400)
                )
                cur.execute(
                    "INSERT INTO orders (id, customer_id, status, amount, created_at, updated_at)"
                    " VALUES (%s, 1, 'inserted', 1.00, %s, clock_timestamp())",
                    (next_id, created),
                )
                next_id += 1
                self.inserts += 1
                time.sleep(0.002)
            conn.close()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


class LiveLoop(threading.Thread):
    """The live DAG on a very short schedule."""

    def __init__(self, spec, retries):
        super().__init__(daemon=True, name="live-ingest")
        self.spec, self.retries = spec, retries
        self.stop = threading.Event()
        self.watermarks, self.loaded = [], 0
        self.error = None

    def run(self):
        try:
            while not self.stop.is_set():
                result = with_retries(run_live_ingest, self.spec, counter=self.retries)
                self.watermarks.append(result.watermark)
                self.loaded += result.inserted + result.updated
                time.sleep(0.02)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_backfill_live_and_writer_converge_to_the_source(round_, seeded, pg):
    src, dst = seeded
    # No lookback on purpose: a re-read would repair a lost update and hide it. Safe here because the one
    # writer commits in stamp order, so no write becomes visible below a watermark already passed (the
    # late-commit case is the lookback test below).
    spec = make_spec(src, dst, lookback_s=0)
    # widen the window between a chunk's extract and its upsert, so live ingest often commits in between
    pg(dst).cursor().execute(
        """CREATE FUNCTION slow_backfill() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF current_setting('application_name') LIKE 'backfill:%' THEN PERFORM pg_sleep(0.002); END IF;
           RETURN NEW; END $$;
           CREATE TRIGGER slow_backfill BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION slow_backfill();"""
    )
    # chunks and live runs do deadlock now and then (each locks its keys in its own order); both retry, as
    # in production. The default 1 s deadlock_timeout only makes rounds slower, so detect them faster here.
    pg(dst).cursor().execute(
        sql.SQL("ALTER DATABASE {} SET deadlock_timeout = '100ms'").format(sql.Identifier(dst.rsplit("/", 1)[1]))
    )
    t0 = time.monotonic()
    run_live_ingest(spec)  # live ingest is already running when the backfill starts
    retries: list = []
    writer, live = Writer(src, seed=round_), LiveLoop(spec, retries)
    writer.start()
    live.start()
    try:
        plan = build_plan(spec, "2024-01-01", "2024-01-03", dst_conn=pg(dst))
        assert len(plan.chunks) == 48 and not plan.clipped
        with ThreadPoolExecutor(2) as pool:
            first = list(pool.map(lambda c: with_retries(transfer_chunk, spec, c, counter=retries), plan.chunks))
            # a second, full pass (as a reprocess run would) while the writer keeps going
            again = build_plan(spec, "2024-01-01", "2024-01-03", reprocess=True, dst_conn=pg(dst))
            second = list(pool.map(lambda c: with_retries(transfer_chunk, spec, c, counter=retries), again.chunks))
    finally:
        writer.stop.set()
        writer.join(10)
        live.stop.set()
        live.join(30)
    assert writer.error is None, writer.error
    assert live.error is None, live.error
    run_live_ingest(spec)  # the live DAG's next scheduled run after the writer stopped
    elapsed = time.monotonic() - t0

    assert_converged(src, dst)
    assert live.watermarks == sorted(live.watermarks), "the watermark moved backwards"
    # the race really happened: the writer changed rows in the range while chunks loaded, both sides wrote
    assert writer.updates > 300 and writer.inserts > 100
    assert live.loaded > 0 and sum(r.inserted + r.updated for r in first + second) > 0
    assert elapsed < BOUND_S, f"race round took {elapsed:.1f}s (bound {BOUND_S}s)"
    print(
        f"round {round_}: {writer.updates} updates + {writer.inserts} inserts, {len(live.watermarks)} live runs "
        f"({live.loaded} rows), {len(first) + len(second)} chunk loads, {len(retries)} transient retries {sorted(set(retries))}, {elapsed:.1f}s"
    )


def _wait_for_sleeping_backend(dst, prefix, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fetch_all(
            dst,
            "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND application_name LIKE %s",
            (prefix + "%",),
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"no backend of {prefix!r} reached the injected pause within {timeout}s")


def test_live_commits_the_newer_version_while_a_chunk_holds_the_older_one_staged(seeded, pg):
    """Chunk stages U1 of key K; live ingest then commits U2; the chunk's upsert afterwards must keep U2."""
    src, dst = seeded
    spec = make_spec(src, dst)
    run_live_ingest(spec)
    chunk = plan_chunks("2024-01-01", "2024-01-02", "day", "UTC")[0]
    key = 100  # created on 2024-01-01, so in this chunk
    # pause the chunk's upsert right when it proposes the OLD version of K (BEFORE INSERT fires before the
    # conflict check, so K is not locked yet and live ingest can commit the newer one meanwhile)
    pg(dst).cursor().execute(
        f"""CREATE FUNCTION pause() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.id = {key} AND NEW.status <> 'v2' THEN PERFORM pg_sleep(1.5); END IF; RETURN NEW; END $$;
            CREATE TRIGGER pause BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION pause();"""
    )
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(transfer_chunk, spec, chunk)
        _wait_for_sleeping_backend(dst, "backfill:")  # the chunk has staged U1 and is inside its upsert
        pg(src).cursor().execute(
            "UPDATE orders SET status = 'v2', updated_at = clock_timestamp() WHERE id = %s", (key,)
        )
        live_result = run_live_ingest(spec)
        assert live_result.inserted == 1  # U2 committed while the chunk still holds U1
        assert not loading.done()
        result = loading.result(timeout=30)
    assert result.rows_extracted == ROWS // DAYS
    assert fetch_all(dst, "SELECT status FROM orders WHERE id = %s", (key,)) == [("v2",)]
    pg(dst).cursor().execute("DROP TRIGGER pause ON orders")
    for c in plan_chunks("2024-01-02", "2024-01-03", "day", "UTC"):
        transfer_chunk(spec, c)
    assert_converged(src, dst)


@pytest.mark.parametrize("lookback_s, caught", [(5, True), (0, False)])
def test_a_write_committed_after_the_watermark_passed_it_is_caught_by_the_lookback(lookback_s, caught, seeded, pg):
    """A source transaction stamps K at T1, a later one (T2 > T1) commits first and live ingest moves the
    watermark to T2; K commits afterwards with T1 < watermark. The next live run must still load it."""
    src, dst = seeded
    spec = make_spec(src, dst, lookback_s=lookback_s)
    for c in plan_chunks("2024-01-01", "2024-01-03", "day", "UTC"):
        transfer_chunk(spec, c)
    run_live_ingest(spec)
    slow = psycopg2.connect(src)  # a long application transaction: now() is its start time, T1
    slow_cur = slow.cursor()
    slow_cur.execute("UPDATE orders SET status = 'slow', updated_at = now() WHERE id = 7 RETURNING updated_at")
    t1 = slow_cur.fetchone()[0]
    deadline = time.monotonic() + 10  # T2 below must be strictly later than T1: wait for the clock, not a nap
    while not fetch_all(src, "SELECT clock_timestamp() > %s", (t1,))[0][0]:
        assert time.monotonic() < deadline, "the server clock did not move past T1"
    fast = pg(src).cursor()
    fast.execute("UPDATE orders SET status = 'fast', updated_at = clock_timestamp() WHERE id = 8")  # T2, committed
    run_live_ingest(spec)  # watermark -> T2; K (id 7) not visible yet
    wm = fetch_all(dst, "SELECT watermark FROM backfill_watermarks")[0][0]
    slow.commit()  # K becomes visible with T1 < watermark
    slow.close()
    assert fetch_all(src, "SELECT updated_at < %s FROM orders WHERE id = 7", (wm,)) == [(True,)]
    run_live_ingest(spec)  # the next scheduled run
    status = fetch_all(dst, "SELECT status FROM orders WHERE id = 7")[0][0]
    if caught:
        assert status == "slow"
        assert_converged(src, dst)
    else:  # why the lookback exists: without it this write is lost until a reprocess backfill
        assert status != "slow"
