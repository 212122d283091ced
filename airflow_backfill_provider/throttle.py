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
from typing import Any, Literal

import psycopg2.extensions
from psycopg2 import sql

from airflow_backfill_provider import ddl
from airflow_backfill_provider import sql as q
from airflow_backfill_provider.spec import TableName, ThrottleSpec

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
    #: the source server's latency over its quiet baseline (loadsignal.py); None when not measured
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
    from airflow_backfill_provider.deadlines import GRACE_S

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
    from airflow_backfill_provider.loadsignal import soft_ratio

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
    """Create the pacing table if missing: the provider's one DDL mechanism (ddl.py), its own short transaction."""
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
