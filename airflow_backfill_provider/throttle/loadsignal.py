"""A load signal that sees the whole source server, averaged over a short window (issue 17).

A snapshot count of active sessions is blind to an OLTP load behind a fixed client pool: its sessions
are "active" only for the microseconds of each statement. What does move when the server is saturated
(by the OLTP itself or by our COPY) is the time transactions take. Measured with pgbench on this
machine (benchmarks/signals.py), the figure that tracked pgbench's own latency best, on separate and
on shared servers, was the **server-wide transaction latency** by Little's law:

    latency = (client sessions inside a transaction, averaged over the window) / (transactions per second)

both read-only and server-wide, ours excluded. For writing transactions both terms are exact: sessions
holding a transaction id (``pg_stat_activity.backend_xid``) and the rate at which ids are assigned
(``pg_current_snapshot()``'s xmax). A read-mostly server falls back to every session inside a transaction
and ``pg_stat_database``'s transaction counts, which each backend flushes at most once a second, so a short
window sees them in steps. It needs no extension and no privilege beyond ``pg_monitor`` for other users'
sessions. A **canary** (the round trip of ``SELECT 1``, median of short bursts) is sampled in the same
window and logged, but not decided on: it moved weakly or the wrong way when source and destination were
on separate servers, and on a small shared host it follows every other process's CPU use. The chunk
compares the transaction latency with the same source's **quiet baseline**, so the budget reads in user
terms: ``throttle.max_latency_ratio: 2.0`` = "keep the source's transaction latency under twice its
quiet value". A window with too few transactions to measure (no OLTP traffic) does not hold a chunk.

Airflow's own metadata database, when it lives on the source's server (the quick start, a laptop), is left
out as our sessions are once the spec names it (``throttle.ignore_databases``): its sessions are the backfill's
machinery, and counted they made the budget throttle the backfill against its own destination writes. Named,
not detected: an Airflow 3 task cannot see the metadata database's address (the supervisor blanks
``sql_alchemy_conn``), and the start gate, the read watch and the load trigger must all read the same signal.

The baseline is the lowest window value seen for this source, kept in the destination database (the
source stays read-only), one row per source connection id, shared by every chunk, worker and DAG
reading that source; ``throttle.latency_baseline_ms`` sets it instead.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Any

import psycopg2
from psycopg2 import sql

log = logging.getLogger(__name__)

#: floors under the figures compared: a loopback round trip is ~0.03-0.2 ms and a quiet TPC-B
#: transaction ~0.3 ms; ratios of numbers below these are noise, not load
CANARY_FLOOR_MS = 0.2
XACT_FLOOR_MS = 0.3
#: fewer transactions than this in a window: too few to estimate their latency (and little OLTP to harm)
MIN_XACTS = 20
#: a session inside one transaction for longer than this is not OLTP (a report, a leaked session): not counted
MAX_XACT_AGE_S = 5.0

_ACTIVITY = sql.SQL(
    """
    SELECT count(*) FILTER (WHERE NOT ours AND state IN ('active', 'fastpath function call')),
           count(*) FILTER (WHERE NOT ours AND xact_start > clock_timestamp() - make_interval(secs => %(age)s)
                            AND NOT (state LIKE 'idle in transaction%%'
                                     AND state_change < clock_timestamp() - interval '1 second')),
           count(*) FILTER (WHERE NOT ours AND backend_xid IS NOT NULL),
           count(*) FILTER (WHERE NOT ours AND (wait_event_type = 'IO'
                                                OR (wait_event_type = 'LWLock' AND wait_event LIKE 'WAL%%'))),
           count(*) FILTER (WHERE ours AND state = 'active' AND upper(left(ltrim(query), 4)) = 'COPY'
                            AND position('TO STDOUT' IN upper(query)) > 0)
      FROM (SELECT *, (coalesce(left(application_name, char_length(%(prefix)s)) = %(prefix)s, false)
                       OR coalesce(datname = ANY(%(ignored_dbs)s), false)) AS ours
              FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()) AS a
    """
)
# transactions ended (flushed by each backend at most once a second: a short window sees it in steps) and
# the next transaction id (advances at once with every writing transaction): read together
_XACTS = (
    "SELECT (SELECT sum(xact_commit + xact_rollback)::float8 FROM pg_stat_database), "
    "pg_snapshot_xmax(pg_current_snapshot())::text::float8"
)


@dataclasses.dataclass(frozen=True)
class LoadWindow:
    """What one window of sampling saw on the whole source server."""

    #: median round trip of ``SELECT 1``, ms
    canary_ms: float
    #: server-wide transaction latency by Little's law, ms (None: fewer than MIN_XACTS transactions):
    #: writing transactions (in flight with an xid / xids assigned per second) when there are enough of
    #: them, else all transactions (in flight / pg_stat_database rate)
    xact_latency_ms: float | None
    #: server-wide transactions/s over the window (pg_stat_database; steps of ~1 s per backend)
    xact_rate: float | None
    #: average active client sessions server-wide (ours excluded)
    aas: float
    #: average client sessions inside a (young) transaction server-wide (ours excluded)
    in_xact: float
    #: average sessions waiting on IO or WAL server-wide (ours excluded)
    io_wal_waits: float
    #: our own chunks reading the source (sessions named backfill:* running a COPY ... TO STDOUT; the most
    #: seen in the window; other chunks' probe windows, and their destination COPY FROM STDIN when the
    #: destination is the same server, are not reading)
    own_active: int
    window_s: float
    #: transaction ids assigned per second over the window (writing transactions, server-wide)
    write_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _canary_burst(cur, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        cur.execute("SELECT 1")
        cur.fetchone()
        out.append((time.perf_counter() - t0) * 1000)
    return out


class WindowStopped(Exception):
    """``sample_window`` was asked to stop before the window ended (throttle.ReadWatch stopping)."""


def sample_window(
    conn,
    *,
    window_s: float = 2.0,
    samples: int = 10,
    burst: int = 3,
    exclude_application_prefix: str = "backfill:",
    exclude_databases: list[str] | tuple[str, ...] = (),
    stop=None,
) -> LoadWindow:
    """Sample the whole source server for about ``window_s`` seconds on ``conn``; leave it idle.

    ``samples`` times, evenly spread: a burst of ``burst`` canary round trips and one
    ``pg_stat_activity`` sample; the server-wide transaction counter at both ends. It all runs in one
    transaction, so the window adds one transaction to the count it measures, not one per statement.
    The pauses between samples are what makes it a window: a single snapshot is what made the old
    probe blind. ``stop``: a ``threading.Event``; once set, the window ends at its next pause with
    :class:`WindowStopped`. ``exclude_databases``: sessions connected to these count as ours (left out).
    """
    autocommit = conn.autocommit
    if autocommit:
        conn.autocommit = False
    else:
        conn.rollback()
    lat: list[float] = []
    active: list[int] = []
    in_xact: list[int] = []
    writing: list[int] = []
    waits: list[int] = []
    own = 0
    try:
        with conn.cursor() as cur:
            # read committed whatever the session's default: pg_current_snapshot() must move in the window
            cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            cur.execute(_XACTS)
            (x0, id0), t0 = cur.fetchone(), time.monotonic()
            gap = window_s / samples
            for i in range(samples):
                s0 = time.monotonic()
                lat.extend(_canary_burst(cur, burst))
                cur.execute("SELECT pg_stat_clear_snapshot()")  # pg_stat_* are snapshotted per transaction
                cur.execute(
                    _ACTIVITY,
                    {
                        "prefix": exclude_application_prefix,
                        "age": MAX_XACT_AGE_S,
                        "ignored_dbs": list(exclude_databases),
                    },
                )
                a, x, xw, w, o = cur.fetchone()
                active.append(a)
                in_xact.append(x)
                writing.append(xw)
                waits.append(w)
                own = max(own, o)
                if i < samples - 1:
                    pause = max(0.0, gap - (time.monotonic() - s0))  # spreads the samples; not a wait for load
                    if stop is None:
                        time.sleep(pause)
                    elif stop.wait(pause):
                        raise WindowStopped("the window was stopped")
            cur.execute(_XACTS)
            (x1, id1), t1 = cur.fetchone(), time.monotonic()
    finally:
        conn.rollback()
        conn.autocommit = autocommit
    span = t1 - t0
    n = (x1 - x0) if (x0 is not None and x1 is not None) else 0
    n_write = id1 - id0
    rate = n / span if span > 0 else None
    avg_in_xact = statistics.fmean(in_xact)
    if n_write >= MIN_XACTS and span > 0:  # exact, no flush steps: preferred
        latency = 1000 * statistics.fmean(writing) / (n_write / span)
    elif n >= MIN_XACTS and rate:
        latency = 1000 * avg_in_xact / rate
    else:
        latency = None
    return LoadWindow(
        canary_ms=statistics.median(lat),
        xact_latency_ms=latency,
        xact_rate=rate,
        aas=statistics.fmean(active),
        in_xact=avg_in_xact,
        io_wal_waits=statistics.fmean(waits),
        own_active=own,
        window_s=round(span, 3),
        write_rate=n_write / span if span > 0 else None,
    )


# --- baseline and ratio ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The source's quiet values (ms); None where never measured."""

    xact_latency_ms: float | None = None
    canary_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Baseline":
        d = d or {}
        return cls(xact_latency_ms=d.get("xact_latency_ms"), canary_ms=d.get("canary_ms"))


def latency_ratio(window: LoadWindow, baseline: Baseline) -> float | None:
    """Transaction latency over its baseline (both floored); None when the window had too few transactions
    to measure it: no OLTP traffic on the server, so none to protect.

    The canary is not part of the decision: measured under pgbench (benchmarks/signals.py) it moved weakly
    or the wrong way when source and destination were on separate servers, and on a shared 2-core host it
    follows every other process's CPU use, so a budget on it kept chunks waiting after the OLTP load had
    stopped. It is logged next to the ratio.
    """
    now, base = window.xact_latency_ms, baseline.xact_latency_ms
    if now is None:
        return None
    return max(now, XACT_FLOOR_MS) / max(base if base is not None else now, XACT_FLOOR_MS)


def _baseline_columns() -> sql.Composable:
    return sql.SQL(
        "source_key text PRIMARY KEY, xact_latency_ms float8, canary_ms float8, "
        "updated_at timestamptz NOT NULL DEFAULT now(), look_ratio float8, look_at timestamptz"
    )


# --- a recent look, shared by the chunks of one source ------------------------------------------------------
#
# A chunk's start takes a short window (start_window_s, 0.5 s) before it reads. Measured per chunk that is
# 0.5 s of every small chunk's time on an idle source. The look a chunk took is kept beside the baseline; a
# chunk starting within look_fresh_s of it, when it said "idle" or "comfortably under the budget", uses it
# instead of its own window: at most one window per look_fresh_s per source, whatever the chunk size. A look
# over the soft budget is never re-used (then who else is reading matters, and that changes by the second).


@dataclasses.dataclass(frozen=True)
class Look:
    ratio: float | None  # None: the window measured no OLTP traffic (idle)
    age_s: float


def look_fresh_s(throttle) -> float:
    return 2.0 * throttle.load_window_s


def read_state(conn, table, key: str) -> tuple[Baseline | None, Look | None, bool]:
    """(stored baseline, last look, whether the table has the look columns); one statement, read-only.
    ``conn``: a destination connection; left idle."""
    from airflow_backfill_provider.core.spec import TableName

    table = TableName.parse(table)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (str(table),))
            if not cur.fetchone()[0]:
                return None, None, False
            # to_jsonb: a baseline table of an earlier release has no look columns
            cur.execute(
                sql.SQL(
                    "SELECT to_jsonb(b), extract(epoch FROM clock_timestamp() - (to_jsonb(b) ->> 'look_at')::timestamptz)"
                    " FROM {t} AS b WHERE source_key = %s"
                ).format(t=sql.Identifier(*table.parts)),
                (key,),
            )
            row = cur.fetchone()
            if row is None:
                cur.execute(
                    "SELECT count(*) = 2 FROM pg_attribute WHERE attrelid = to_regclass(%s)"
                    " AND attname IN ('look_ratio', 'look_at') AND NOT attisdropped",
                    (str(table),),
                )
                return None, None, bool(cur.fetchone()[0])
    finally:
        conn.rollback()
    doc, age = row
    base = None if doc.get("xact_latency_ms") is None else Baseline(doc["xact_latency_ms"], doc.get("canary_ms"))
    look = None if age is None else Look(ratio=doc.get("look_ratio"), age_s=max(0.0, float(age)))
    return base, look, "look_at" in doc


def record_look(conn, table, key: str, ratio: float | None, *, has_columns: bool) -> None:
    """Keep this chunk's look for the next ones (commits). Adds the look columns to an earlier release's table."""
    from airflow_backfill_provider.core import ddl
    from airflow_backfill_provider.core.spec import TableName

    table = TableName.parse(table)
    t = sql.Identifier(*table.parts)
    ddl.ensure_table(conn, table, _baseline_columns())
    with conn.cursor() as cur:
        if not has_columns:
            cur.execute(
                sql.SQL(
                    "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS look_ratio float8, ADD COLUMN IF NOT EXISTS look_at timestamptz"
                ).format(t=t)
            )
        cur.execute(
            sql.SQL(
                "INSERT INTO {t} AS b (source_key, look_ratio, look_at) VALUES (%s, %s, clock_timestamp())"
                " ON CONFLICT (source_key) DO UPDATE SET look_ratio = EXCLUDED.look_ratio, look_at = EXCLUDED.look_at"
            ).format(t=t),
            (key, ratio),
        )
    conn.commit()


def learn_baseline(conn, table, key: str, window: LoadWindow) -> Baseline:
    """Lower the stored baseline of ``key`` to this window's values where lower; return it. Commits.

    ``conn`` is a destination connection (not autocommit); ``table`` the spec's ``throttle.baseline_table``.
    """
    from airflow_backfill_provider.core import ddl
    from airflow_backfill_provider.core.spec import TableName

    table = TableName.parse(table)
    ddl.ensure_table(conn, table, _baseline_columns())
    t = sql.Identifier(*table.parts)
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                """
                INSERT INTO {t} AS b (source_key, xact_latency_ms, canary_ms) VALUES (%(k)s, %(x)s, %(c)s)
                ON CONFLICT (source_key) DO UPDATE
                   SET xact_latency_ms = least(b.xact_latency_ms, EXCLUDED.xact_latency_ms),
                       canary_ms = least(b.canary_ms, EXCLUDED.canary_ms),
                       updated_at = now()
                RETURNING xact_latency_ms, canary_ms
                """
            ).format(t=t),
            {"k": key, "x": window.xact_latency_ms, "c": window.canary_ms},
        )
        x, c = cur.fetchone()
    conn.commit()
    return Baseline(xact_latency_ms=x, canary_ms=c)


def read_baseline(conn, table, key: str) -> Baseline | None:
    """The stored baseline of ``key``, without lowering it; None when none is stored (or no table yet).

    ``conn``: a destination connection; left idle (its transaction is rolled back)."""
    from airflow_backfill_provider.core.spec import TableName

    table = TableName.parse(table)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (str(table),))
            if not cur.fetchone()[0]:
                return None
            cur.execute(
                sql.SQL("SELECT xact_latency_ms, canary_ms FROM {t} WHERE source_key = %s").format(
                    t=sql.Identifier(*table.parts)
                ),
                (key,),
            )
            row = cur.fetchone()
    finally:
        conn.rollback()
    return None if row is None or row[0] is None else Baseline(xact_latency_ms=row[0], canary_ms=row[1])


def soft_ratio(max_ratio: float) -> float:
    """Half-way to the budget: above it only one chunk of ours may read the source at a time."""
    return 1.0 + (max_ratio - 1.0) / 2.0


def measure(
    conn,
    throttle,
    *,
    baseline: Baseline | None = None,
    learn=None,
    exclude_application_prefix: str = "backfill:",
    window_s: float | None = None,
    stop=None,
) -> dict[str, Any]:
    """Sample a window on the source ``conn`` and rate it against the baseline.

    The baseline is ``learn(window)`` (the operator: lower and read the stored one), else ``baseline``
    (the trigger: the one the chunk read before it deferred); ``throttle.latency_baseline_ms`` overrides
    its transaction latency. Returns the LoadSample fields ``latency_ratio``, ``own_active`` and ``window``.
    """
    window = sample_window(
        conn,
        window_s=window_s or throttle.load_window_s,
        exclude_application_prefix=exclude_application_prefix,
        exclude_databases=throttle.ignore_databases,
        stop=stop,
    )
    if learn is not None:
        baseline = learn(window)
    baseline = baseline or Baseline()
    if throttle.latency_baseline_ms is not None:
        baseline = dataclasses.replace(baseline, xact_latency_ms=throttle.latency_baseline_ms)
    ratio = latency_ratio(window, baseline)
    return {
        "latency_ratio": None if ratio is None else round(ratio, 3),
        "own_active": window.own_active,
        "window": {**window.to_dict(), "baseline": baseline.to_dict()},
    }


def add_latency(sample, conn, spec, appname: str, *, destination: str | None = None):
    """The chunk's probe, extended: a window on the chunk's own source session, rated against the
    baseline learned in the destination (``destination``: a DSN in place of the spec's connection id).

    With ``throttle.watch_reads`` (the default) the read itself is watched on full ``load_window_s`` windows,
    which also lower the baseline (throttle.ReadWatch), so the start only takes a short look: a
    ``start_window_s`` window rated against the stored baseline. It seeds the baseline when none is stored
    yet, and does not lower a stored one (the minimum of short windows would be biased low). A window that
    measured nothing (too few transactions: an idle source) costs no destination session."""
    from airflow_backfill_provider.connections import close_all, connect

    throttle = spec.throttle

    def dst():
        return connect(
            destination or spec.destination_conn_id,
            application_name=f"{appname}:baseline",
            statement_timeout_s=10,
            lock_timeout_s=10,
        )

    def learn(window: LoadWindow) -> Baseline:
        c = dst()
        try:
            return learn_baseline(c, throttle.baseline_table, spec.source_conn_id, window)
        finally:
            close_all(c)

    if not throttle.watch_reads:
        return dataclasses.replace(sample, **measure(conn, throttle, learn=learn))
    c = dst()
    try:
        stored, look, has_columns = read_state(c, throttle.baseline_table, spec.source_conn_id)
    finally:
        close_all(c)
    budget = throttle.max_latency_ratio
    if (
        look is not None
        and look.age_s < look_fresh_s(throttle)
        and (look.ratio is None or budget is None or look.ratio <= soft_ratio(budget))
    ):
        # another chunk looked a moment ago and the source was idle or well under budget: re-use its look
        return dataclasses.replace(
            sample, latency_ratio=look.ratio, own_active=0, window={"reused_look_age_s": round(look.age_s, 2)}
        )

    def seed(window: LoadWindow) -> Baseline:
        if window.xact_latency_ms is None or stored is not None:
            return stored or Baseline()
        return learn(window)

    short = min(throttle.start_window_s, throttle.load_window_s)
    measured = measure(conn, throttle, learn=seed, window_s=short)
    c = dst()
    try:
        record_look(c, throttle.baseline_table, spec.source_conn_id, measured["latency_ratio"], has_columns=has_columns)
    except psycopg2.Error:  # the look is an optimisation: a chunk never fails for want of it
        log.warning("could not keep the load look in %s", throttle.baseline_table, exc_info=True)
    finally:
        close_all(c)
    return dataclasses.replace(sample, **measured)
