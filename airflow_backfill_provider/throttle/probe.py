"""Source protection: measure the source's load, decide go/wait/critical, and pace source queries.

Three levers protect a production source (see docs/source-protection.md):

1. **Pool** - an Airflow pool caps how many chunks are in flight against the source at once.
2. **Load threshold** - before a chunk queries the source it probes ``pg_stat_activity``; over
   ``throttle.max_active`` (or ``max_replica_lag``) it *waits deferred* (``triggers/load.py``),
   over ``throttle.critical_active`` it fails at once without retry (gh-ost's critical-load).
3. **Pacing** - ``throttle.min_query_interval`` seconds between two source queries of the same
   pacing slot; a chunk whose turn is later *defers until its turn* (a time-based trigger).

Nothing here busy-waits: this module only measures, decides and reserves; the operator defers.

Pacing design (per pool slot, across processes and hosts)
---------------------------------------------------------
Chunks run in different worker processes, possibly on different hosts, so the pacing state lives
in the **destination** database (the source stays read-only): a small table with one row per
``(pacing_key, slot)`` holding the time that slot last started (or is reserved to start) a source
query. ``pacing_key`` is the pool name, so every DAG sharing a pool shares its pacing slots, and
``throttle.pacing_slots`` should equal the pool's slot count.

To get a turn, a chunk, in one short transaction under a transaction-scoped advisory lock on the
key (so reservations are serialized and never race), takes the slot whose last start is earliest
and reserves ``turn = greatest(now, last_start + min_query_interval)`` on it. At most
``pacing_slots`` source queries start in any window of ``min_query_interval`` seconds: a sliding
window. The reservation is made *in advance*, so a chunk that has to wait knows exactly when its
turn is and defers until then with a time-based trigger; it does not re-compete on resume (no
thundering herd, no starvation). A chunk that dies before its turn just leaves a reservation that
lapses; it delays nobody by more than one interval. All times come from the destination server's
clock and the wait is returned as a *duration*, so worker/triggerer clock skew does not matter.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from typing import Any, Literal

import psycopg2.extensions
from psycopg2 import sql

from airflow_backfill_provider.core import ddl
from airflow_backfill_provider.core import sql as q
from airflow_backfill_provider.core.spec import TableName, ThrottleSpec

log = logging.getLogger(__name__)

Decision = Literal["go", "wait", "critical"]

#: application_name prefix of every session this provider opens (``backfill:<dag_id>:<chunk_id>``);
#: the probe does not count them: our own concurrency is the pool's business, not the load threshold's.
OWN_APPLICATION_PREFIX = "backfill:"

DEFAULT_PACING_TABLE = ThrottleSpec.model_fields["pacing_table"].default

# Session states that mean "doing work now". 'idle', 'idle in transaction' (not running anything)
# and NULL (state hidden: the probing user lacks pg_read_all_stats) are not active.
_ACTIVE_STATES = ("active", "fastpath function call")


@dataclasses.dataclass(frozen=True)
class LoadSample:
    """What the probe saw on the source database at ``sampled_at`` (source server clock, UTC)."""

    #: non-idle client sessions on the source database, excluding ours
    active: int
    #: seconds since the last replayed transaction when the source is a standby, else None
    replica_lag: float | None
    sampled_at: dt.datetime
    #: client sessions whose state the probing user may not see (grant it pg_monitor to count them)
    hidden: int = 0
    in_recovery: bool = False
    #: the source server's latency over its quiet baseline (throttle/loadsignal.py); None when not measured
    latency_ratio: float | None = None
    #: our own chunks' sessions active on the source during the window
    own_active: int = 0
    #: the window's figures and the baseline (JSON-safe), for the log and XCom
    window: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, for trigger events and XCom."""
        d = dataclasses.asdict(self)
        d["sampled_at"] = self.sampled_at.isoformat()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoadSample":
        return cls(
            active=int(d["active"]),
            replica_lag=None if d.get("replica_lag") is None else float(d["replica_lag"]),
            sampled_at=dt.datetime.fromisoformat(d["sampled_at"]),
            hidden=int(d.get("hidden", 0)),
            in_recovery=bool(d.get("in_recovery", False)),
            latency_ratio=None if d.get("latency_ratio") is None else float(d["latency_ratio"]),
            own_active=int(d.get("own_active", 0)),
            window=d.get("window"),
        )

    def describe(self) -> str:
        text = f"{self.active} active session(s) on the source database"
        if self.in_recovery:
            lag = "unknown" if self.replica_lag is None else f"{self.replica_lag:.1f} s"
            text += f", replica lag {lag}"
        if self.window is not None:
            w = self.window
            x = w.get("xact_latency_ms")
            text += (
                f", source latency {'-' if self.latency_ratio is None else format(self.latency_ratio, '.2f')}x "
                f"its quiet baseline (transactions "
                f"{'-' if x is None else format(x, '.2f')} ms, canary {w.get('canary_ms', 0):.2f} ms, "
                f"{w.get('xact_rate') or 0:.0f} xact/s server-wide; {self.own_active} chunk(s) of ours reading)"
            )
        if self.hidden:
            text += f" ({self.hidden} more hidden from the probe's user: grant it pg_monitor)"
        return text


def _probe_query(exclude_application_prefix: str | None) -> sql.Composed:
    exclude = sql.SQL("")
    if exclude_application_prefix:
        # left(...) rather than LIKE: '_' and '%' in the prefix must not act as wildcards.
        exclude = sql.SQL(" AND (application_name IS NULL OR left(application_name, char_length({p})) <> {p})").format(
            p=sql.Literal(exclude_application_prefix)
        )
    return sql.SQL(
        """
        SELECT count(*) FILTER (WHERE backend_type = 'client backend' AND state IN ({states})) AS active,
               count(*) FILTER (WHERE backend_type IS NULL AND state IS NULL) AS hidden,
               pg_is_in_recovery() AS in_recovery,
               CASE WHEN pg_is_in_recovery()
                    THEN extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8
               END AS replica_lag,
               clock_timestamp() AS sampled_at
          FROM pg_stat_activity
         WHERE datname = current_database()
           AND pid <> pg_backend_pid(){exclude}
        """
    ).format(states=sql.SQL(", ").join(sql.Literal(s) for s in _ACTIVE_STATES), exclude=exclude)


def probe_load(
    conn, *, exclude_application_prefix: str | None = OWN_APPLICATION_PREFIX, timeout_s: float | None = None
) -> LoadSample:
    """Count busy client sessions on the connection's database, and the replica lag on a standby.

    Counted: client backends (not autovacuum, walsenders, background workers) whose state is
    ``active``, other than this session and sessions whose ``application_name`` starts with
    ``exclude_application_prefix`` (our own chunks). On a primary, ``replica_lag`` is None. On a
    standby it is ``now() - pg_last_xact_replay_timestamp()``: note that it grows while the primary
    has no writes at all, so keep ``max_replica_lag`` comfortably above the primary's quietest gap.

    ``timeout_s`` bounds the probe on a non-autocommit session (the chunk's own).
    Leaves the connection as it found it: a probe on a non-autocommit connection does not leave an
    ``idle in transaction`` session behind.
    """
    from airflow_backfill_provider.connections import timeout_ms  # never 0 ms: 0 means no timeout
    from airflow_backfill_provider.core.deadlines import GRACE_S

    was_idle = conn.autocommit or conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    session_deadline = getattr(conn, "client_deadline_s", None)
    if timeout_s is not None and session_deadline is not None:  # the client-side bound follows the probe's
        conn.client_deadline_s = min(session_deadline, timeout_s + GRACE_S)
    try:
        # one round trip: the statements go in one simple query, run in order, the last one's row returned
        steps: list[sql.Composable] = []
        if timeout_s is not None and was_idle and not conn.autocommit:
            # bound the probe on a session whose own statement_timeout is the chunk's (long) one;
            # transaction-local, so the rollback below restores it before the chunk's COPY. Each statement
            # of a multi-statement query gets its own timeout, armed with the setting in force when it starts.
            steps.append(
                sql.SQL("SELECT set_config('statement_timeout', {}, true)").format(
                    sql.Literal(f"{timeout_ms(timeout_s)}ms")
                )
            )
        # pg_stat_activity is snapshotted once per transaction; clear it so a re-probe sees now.
        steps.append(sql.SQL("SELECT pg_stat_clear_snapshot()"))
        steps.append(_probe_query(exclude_application_prefix))
        with conn.cursor() as cur:
            cur.execute(sql.SQL("; ").join(steps))
            active, hidden, in_recovery, lag, sampled_at = cur.fetchone()
        if was_idle and not conn.autocommit:
            conn.rollback()
    finally:
        if session_deadline is not None:
            conn.client_deadline_s = session_deadline
    return LoadSample(
        active=int(active),
        replica_lag=None if lag is None else max(0.0, float(lag)),
        sampled_at=sampled_at.astimezone(dt.timezone.utc),
        hidden=int(hidden),
        in_recovery=bool(in_recovery),
    )


def decide(sample: LoadSample, throttle: ThrottleSpec) -> Decision:
    """``critical`` above ``critical_active``; ``wait`` above ``max_active`` or ``max_replica_lag``."""
    if throttle.critical_active is not None and sample.active > throttle.critical_active:
        return "critical"
    if sample.active > throttle.max_active:
        return "wait"
    if (
        throttle.max_replica_lag is not None
        and sample.replica_lag is not None
        and sample.replica_lag > throttle.max_replica_lag
    ):
        return "wait"
    if _latency_reason(sample, throttle):
        return "wait"
    return "go"


def _latency_reason(sample: LoadSample, throttle: ThrottleSpec) -> str | None:
    """Over the latency budget: wait. Past half of it: only one chunk of ours at a time (back off)."""
    from airflow_backfill_provider.throttle.loadsignal import soft_ratio

    budget, ratio = throttle.max_latency_ratio, sample.latency_ratio
    if budget is None or ratio is None:
        return None
    if ratio > budget:
        return f"source latency {ratio:.2f}x its quiet baseline > throttle.max_latency_ratio={budget:g}"
    if ratio > soft_ratio(budget) and sample.own_active > 0:
        return (
            f"source latency {ratio:.2f}x its quiet baseline > {soft_ratio(budget):g} (half-way to "
            f"throttle.max_latency_ratio={budget:g}) and {sample.own_active} chunk(s) of ours already reading: "
            "one at a time until it recovers"
        )
    return None


def critical_message(sample: LoadSample, throttle: ThrottleSpec) -> str:
    return (
        f"source load is critical: {sample.active} active sessions on the source database "
        f"> throttle.critical_active={throttle.critical_active} (sampled {sample.sampled_at.isoformat()}). "
        "The chunk stops without retry so the backfill adds nothing to an overloaded source; "
        "clear the chunk once the source has recovered, or raise throttle.critical_active."
    )


def wait_reason(sample: LoadSample, throttle: ThrottleSpec) -> str:
    parts = []
    if sample.active > throttle.max_active:
        parts.append(f"{sample.active} active sessions > throttle.max_active={throttle.max_active}")
    if (
        throttle.max_replica_lag is not None
        and sample.replica_lag is not None
        and sample.replica_lag > throttle.max_replica_lag
    ):
        parts.append(f"replica lag {sample.replica_lag:.1f} s > throttle.max_replica_lag={throttle.max_replica_lag}")
    latency = _latency_reason(sample, throttle)
    if latency:
        parts.append(latency)
    return "; ".join(parts) or "load within limits"


def timeout_message(sample: LoadSample | None, throttle: ThrottleSpec, waited_s: float, last_error: str | None) -> str:
    seen = sample.describe() if sample else "no successful probe"
    reason = f" ({wait_reason(sample, throttle)})" if sample else ""
    err = f"; last probe error: {last_error}" if last_error else ""
    return (
        f"source stayed busy for {waited_s:.0f} s >= throttle.max_wait={throttle.max_wait:g} s: "
        f"last probe saw {seen}{reason}{err}. The chunk gives up (Airflow may retry it later); "
        "raise throttle.max_wait, throttle.max_active or throttle.max_latency_ratio if this load is normal "
        "for the source."
    )


# --- pacing ---------------------------------------------------------------------------------------


_PACING_COLUMNS = sql.SQL(
    """pacing_key text NOT NULL,
    slot int NOT NULL,
    last_start timestamptz NOT NULL,
    PRIMARY KEY (pacing_key, slot)"""
)


def ensure_pacing_table(conn, table: TableName) -> None:
    """Create the pacing table if missing: the provider's one DDL mechanism (core/ddl.py), its own short transaction."""
    ddl.ensure_table(conn, table, _PACING_COLUMNS)


@dataclasses.dataclass(frozen=True)
class PacingTurn:
    """A reserved turn: query the source after ``wait_s`` seconds (0 when it is now)."""

    slot: int
    wait_s: float


def reserve_turn(
    conn,
    *,
    key: str,
    interval_s: float,
    slots: int = 1,
    table: str | TableName = DEFAULT_PACING_TABLE,
) -> PacingTurn:
    """Reserve the next source-query turn for ``key`` (the pool name); see the module docstring.

    Runs one short transaction on ``conn`` (a destination connection) and commits it.
    """
    if interval_s <= 0:
        return PacingTurn(slot=0, wait_s=0.0)
    if slots < 1:
        raise ValueError(f"throttle.pacing_slots must be >= 1, got {slots}")
    if conn.autocommit:
        raise ValueError("reserve_turn needs a non-autocommit connection: the advisory lock is transaction-scoped")
    table = TableName.parse(table)
    t = sql.Identifier(*table.parts)
    ensure_pacing_table(conn, table)
    with conn:  # one transaction, committed on exit (psycopg2 semantics), rolled back on error
        with conn.cursor() as cur:
            cur.execute(q.advisory_xact_lock(), (f"pacing|{key}",))  # turns of one key are taken one at a time
            cur.execute(
                sql.SQL(
                    "INSERT INTO {t} (pacing_key, slot, last_start) "
                    "SELECT %s, s, '-infinity' FROM generate_series(0, %s - 1) AS s "
                    "ON CONFLICT (pacing_key, slot) DO NOTHING"
                ).format(t=t),
                (key, slots),
            )
            cur.execute(
                sql.SQL(
                    """
                    WITH pick AS (
                        SELECT slot, last_start FROM {t}
                         WHERE pacing_key = %(key)s AND slot < %(slots)s
                         ORDER BY last_start, slot LIMIT 1
                    ), turn AS (
                        SELECT slot, greatest(clock_timestamp(),
                                              last_start + make_interval(secs => %(interval)s)) AS at
                          FROM pick
                    )
                    UPDATE {t} AS p SET last_start = turn.at
                      FROM turn
                     WHERE p.pacing_key = %(key)s AND p.slot = turn.slot
                    RETURNING p.slot, greatest(0, extract(epoch FROM turn.at - clock_timestamp()))::float8
                    """
                ).format(t=t),
                {"key": key, "slots": slots, "interval": float(interval_s)},
            )
            slot, wait_s = cur.fetchone()
    return PacingTurn(slot=int(slot), wait_s=float(wait_s))


# --- visibility -----------------------------------------------------------------------------------


def chunk_summary(
    *,
    chunk_id: str,
    sample: LoadSample | None,
    waited_load_s: float,
    waited_pacing_s: float,
    rows: int,
    seconds: float,
) -> str:
    """One log line per chunk: the load it saw, how long it waited, rows, seconds and rows/s."""
    rate = rows / seconds if seconds > 0 else 0.0
    seen = sample.describe() if sample else "load not probed"
    return (
        f"chunk {chunk_id}: saw {seen}; waited {waited_load_s:.1f} s for load, {waited_pacing_s:.1f} s for pacing; "
        f"{rows} rows in {seconds:.2f} s ({rate:.0f} rows/s)"
    )


# --- one-call helpers for the chunk operator ------------------------------------------------------

#: bound the probe itself: a source that cannot answer pg_stat_activity within this is not "quiet"
PROBE_TIMEOUT_S = 10


def reserve_destination_turn(
    conn_id_or_dsn: str, throttle: ThrottleSpec, *, key: str, application_name: str
) -> PacingTurn:
    """:func:`reserve_turn` on a short destination session, with the spec's pacing settings."""
    from airflow_backfill_provider.connections import connect

    conn = connect(conn_id_or_dsn, application_name=application_name, lock_timeout_s=PROBE_TIMEOUT_S)
    try:
        return reserve_turn(
            conn,
            key=key,
            interval_s=throttle.min_query_interval,
            slots=throttle.pacing_slots,
            table=throttle.pacing_table,
        )
    finally:
        conn.close()


# --- watching a chunk's read (issue 23) -----------------------------------------------------------

#: the watch's first look comes this long after the read began: a shorter read is the start gate's business
#: (and a chunk of a batch that reads for milliseconds opens no watch session at all)
WATCH_FIRST_CHECK_S = 0.5
#: how long stopping the watch waits for its thread (its query is cancelled first); it closes its session anyway
WATCH_STOP_JOIN_S = 2.0
#: pauses stop once this share of statement_timeout_s has passed since the read began: a paused COPY is still a
#: running statement on both sides, and the rest of the timeout is left for the read itself
PAUSE_SHARE_OF_STATEMENT_TIMEOUT = 0.5


class ReadWatch:
    """Watches the source while one chunk reads; holds the read (the COPY pipe's gate, transfer/pipe.py) while the load
    is over the limits.

    A helper thread, on a short-lived source session of its own (``backfill:...:watch``, read-only, autocommit,
    10 s statement timeout), checks the same signal as the start gate every ``throttle.read_check_s``: the
    active-session count (``probe_load``) and, with ``max_latency_ratio``, a ``load_window_s`` latency window
    against the stored baseline, with this chunk's own COPY left out of "chunks of ours reading". On "wait" or
    "critical" it pauses the read; on "go" it resumes it. The main thread, in :meth:`hold`, then stops draining
    the pipe: the writer thread blocks on the full pipe, libpq stops reading the socket, and the source backend
    blocks on its socket write (wait event ``ClientWrite``) instead of scanning and sending rows.

    Bounds: a chunk pauses ``throttle.max_pause_s`` seconds in all, and never once half of
    ``statement_timeout_s`` has passed since the read began (a paused COPY counts toward the statement timeout
    on both sides); the read then goes on to its end without further pauses. A failed check does not hold the
    read (fail open; the start gate and the bounds stay in force); it is counted and logged once.
    The thread blocks interrupt signals (core/interrupts.py), never holds the read once stopped, and closes its
    session on every path; :meth:`stop` cancels its running query first, so stopping is prompt.
    """

    def __init__(
        self,
        open_source,
        throttle: ThrottleSpec,
        *,
        statement_timeout_s: float,
        open_destination=None,
        baseline_key: str | None = None,
        label: str = "chunk",
        first_check_s: float = WATCH_FIRST_CHECK_S,
    ) -> None:
        self._open_source = open_source  # () -> a new source session, the watch's own
        self._open_destination = open_destination  # () -> a destination session, to read the baseline once
        self._baseline_key = baseline_key
        self.throttle = throttle
        self.label = label
        self.first_check_s = first_check_s
        self.statement_share_s = statement_timeout_s * PAUSE_SHARE_OF_STATEMENT_TIMEOUT
        self._baseline: Any = None  # loadsignal.Baseline once read
        self._baseline_read = throttle.max_latency_ratio is None or throttle.latency_baseline_ms is not None
        self._lock = threading.Lock()  # the session: cancelled by stop() in one thread, closed in the other
        self._conn = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()  # set: the read must hold
        self._running = threading.Event()  # set: the read may go on (the complement, to wait on)
        self._running.set()
        self._released = False  # a bound was reached: no more pauses in this chunk
        self._read_started = 0.0
        self._warned = False
        #: counters, read by the caller once the stream is done
        self.pauses = 0
        self.paused_s = 0.0
        self.longest_pause_s = 0.0
        self.bound: str | None = None
        self.checks = 0
        self.errors = 0
        self.last_error: str | None = None
        self.pause_reason: str | None = None

    # --- the read's side (main thread) ---
    def start(self) -> None:
        """Begin watching (a new thread each time: a chunk may stream twice, the counters add up)."""
        self._read_started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), daemon=True, name="backfill-read-watch")
        self._thread.start()

    def hold(self, slice_s: float) -> None:
        """Return at once unless the read is paused; else wait, in slices of ``slice_s`` (a pending signal's
        handler runs between two), until it is resumed, stopped or a bound is reached."""
        if not self._paused.is_set() or self._released:
            return
        t0 = time.monotonic()
        self.pauses += 1
        try:
            while self._paused.is_set() and not self._released:
                left = self._pause_left(t0)
                if left <= 0:
                    self._release(t0)
                    break
                self._running.wait(min(slice_s, left))
        finally:
            held = time.monotonic() - t0
            self.paused_s += held
            self.longest_pause_s = max(self.longest_pause_s, held)

    def _pause_left(self, t0: float) -> float:
        now = time.monotonic()
        budget = self.throttle.max_pause_s - (self.paused_s + (now - t0))
        statement = self._read_started + self.statement_share_s - now
        return min(budget, statement)

    def _release(self, t0: float) -> None:
        now = time.monotonic()
        if self.throttle.max_pause_s - (self.paused_s + (now - t0)) <= 0:
            self.bound = f"throttle.max_pause_s={self.throttle.max_pause_s:g}"
        else:
            self.bound = f"half of statement_timeout_s ({self.statement_share_s:g} s since the read began)"
        self._released = True
        self._stop.set()  # nothing more to decide for this chunk: the watch session goes now
        log.warning(
            "%s: read paused for %.1f s in all, the limit (%s): reading on to the end although the source is "
            "still busy (%s)",
            self.label,
            self.paused_s + (now - t0),
            self.bound,
            self.pause_reason,
        )

    def stop(self) -> None:
        """End the watch: never leaves the read held; cancels the watch's query; its thread closes its session."""
        self._stop.set()
        self._paused.clear()
        self._running.set()
        with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed:
                try:
                    conn.cancel()
                except Exception:  # noqa: BLE001 - best effort: the thread closes the session anyway
                    pass
        if self._thread is not None:
            self._thread.join(timeout=WATCH_STOP_JOIN_S)

    def summary(self) -> dict[str, Any]:
        return {
            "read_pauses": self.pauses,
            "paused_s": round(self.paused_s, 3),
            "longest_pause_s": round(self.longest_pause_s, 3),
            "pause_bound": self.bound,
            "read_checks": self.checks,
            "watch_errors": self.errors,
        }

    def describe(self) -> str:
        text = (
            f"read paused {self.pauses} time(s), {self.paused_s:.1f} s in all (longest {self.longest_pause_s:.1f} s); "
            f"{self.checks} load check(s) during the read"
        )
        if self.bound:
            text += f"; pauses ended by {self.bound}"
        if self.errors:
            text += f"; {self.errors} check(s) failed (last: {self.last_error})"
        return text

    # --- the watch's side (helper thread) ---
    def _run(self, stop: threading.Event) -> None:
        from airflow_backfill_provider.core.interrupts import leave_signals_to_main_thread

        leave_signals_to_main_thread()
        try:
            if stop.wait(self.first_check_s):
                return
            while not stop.is_set():
                t0 = time.monotonic()
                decision, sample = self._check(stop)
                if stop.is_set():
                    break
                self._apply(decision, sample)
                stop.wait(max(0.0, self.throttle.read_check_s - (time.monotonic() - t0)))
        finally:
            self._paused.clear()
            self._running.set()
            self._close()

    def _session(self):
        with self._lock:
            conn = self._conn
        if conn is None or conn.closed:
            conn = self._open_source()
            conn.autocommit = True
            with self._lock:
                self._conn = conn
        return conn

    def _close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and not conn.closed:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass

    def _load_baseline(self) -> None:
        from airflow_backfill_provider.connections import close_all
        from airflow_backfill_provider.throttle.loadsignal import read_baseline

        self._baseline_read = True
        if self._open_destination is None or self._baseline_key is None:
            return
        dst = self._open_destination()
        try:
            self._baseline = read_baseline(dst, self.throttle.baseline_table, self._baseline_key)
        finally:
            close_all(dst)

    def _learn(self, window):
        """The baseline to rate ``window`` against; lowered (in the destination) by a full window quieter than it.

        Windows taken during the read include this chunk's own load, so they can only err high, and the
        stored baseline only ever goes down (loadsignal.learn_baseline)."""
        from airflow_backfill_provider.connections import close_all
        from airflow_backfill_provider.throttle.loadsignal import Baseline, learn_baseline

        base = self._baseline
        x = window.xact_latency_ms
        quieter = x is not None and (base is None or base.xact_latency_ms is None or x < base.xact_latency_ms)
        if quieter and self.throttle.latency_baseline_ms is None and self._open_destination is not None:
            dst = self._open_destination()
            try:
                self._baseline = learn_baseline(dst, self.throttle.baseline_table, self._baseline_key, window)
            finally:
                close_all(dst)
        return self._baseline or Baseline()

    def _check(self, stop: threading.Event) -> tuple[Decision, LoadSample | None]:
        try:
            if not self._baseline_read:
                self._load_baseline()
            conn = self._session()
            if stop.is_set():
                return "go", None
            sample = probe_load(conn)
            if self.throttle.max_latency_ratio is not None:
                from airflow_backfill_provider.throttle.loadsignal import measure

                sample = dataclasses.replace(sample, **measure(conn, self.throttle, learn=self._learn, stop=stop))
                # "chunks of ours reading" means others: this chunk's own COPY is the one being watched
                sample = dataclasses.replace(sample, own_active=max(0, sample.own_active - 1))
            self.checks += 1
            return decide(sample, self.throttle), sample
        except Exception as err:  # noqa: BLE001 - fail open: a signal we cannot read does not hold the read
            if stop.is_set():  # cancelled by stop(): not a failure
                return "go", None
            self.errors += 1
            self.last_error = str(err).strip()[:300]
            if not self._warned:
                self._warned = True
                log.warning("%s: the load check during the read failed (reading on): %s", self.label, self.last_error)
            self._close()
            return "go", None

    def _apply(self, decision: Decision, sample: LoadSample | None) -> None:
        if decision != "go" and sample is not None:
            if not self._paused.is_set() and not self._released:
                self.pause_reason = wait_reason(sample, self.throttle)
                self._running.clear()
                self._paused.set()
                log.info("%s: read paused (the source waits on its socket) because %s", self.label, self.pause_reason)
        elif self._paused.is_set():
            self._paused.clear()
            self._running.set()
            log.info(
                "%s: read resumed: %s", self.label, sample.describe() if sample is not None else "load check failed"
            )


def read_watch(spec, appname: str, *, source: str | None = None, destination: str | None = None, label: str = ""):
    """The :class:`ReadWatch` of one chunk's read with the spec's settings; None when ``throttle.watch_reads``
    is off. ``source``/``destination``: connection ids or DSNs in place of the spec's."""
    if not spec.throttle.watch_reads:
        return None
    from airflow_backfill_provider.connections import connect, open_source

    name = f"{appname}:watch"

    def open_src():
        return open_source(spec, name, source, statement_timeout_s=PROBE_TIMEOUT_S)

    def open_dst():
        return connect(
            destination or spec.destination_conn_id,
            application_name=name,
            statement_timeout_s=PROBE_TIMEOUT_S,
            lock_timeout_s=PROBE_TIMEOUT_S,
        )

    return ReadWatch(
        open_src,
        spec.throttle,
        statement_timeout_s=spec.statement_timeout_s,
        open_destination=open_dst,
        baseline_key=spec.source_conn_id,
        label=label or appname,
        first_check_s=min(WATCH_FIRST_CHECK_S, spec.throttle.read_check_s),
    )
