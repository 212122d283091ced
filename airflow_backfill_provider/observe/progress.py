"""The progress read model: one run's chunks, their state, rows and speed, totals, ETA and validation.

Pure: it combines what other modules read (ledger rows, Airflow task-instance states of the mapped chunk
task, the run's plan range, the latest validation summary) into one :class:`Progress`. The page of the
Airflow plugin, the ``status`` command and the tests all use it, so they show the same figures.

A chunk's state, most telling first:

* ``failed``   its task instance failed (or upstream_failed): clear it to retry;
* ``running``  running, queued (handed to the executor), up_for_retry (it will run again);
* ``deferred`` waiting, without a worker slot, for the source's load to drop or its pacing turn;
* ``pending``  planned, not started (no task state yet, or scheduled: waiting for a pool slot);
* ``loaded``   committed by this run (a ledger row exists, or the task succeeded);
* ``skipped``  skipped as done: the plan found it in the ledger from an earlier run.
"""

from __future__ import annotations

import math

import datetime as dt
from dataclasses import dataclass, field
from typing import Iterable
from zoneinfo import ZoneInfo
from psycopg2 import sql

from airflow_backfill_provider.core import ddl
from airflow_backfill_provider.core.chunks import iter_chunks, split_at, to_datetime
from airflow_backfill_provider.core.spec import BackfillSpec, TableName

STATES = ("failed", "running", "deferred", "pending", "loaded", "skipped")
_RANK = {s: i for i, s in enumerate(STATES)}  # a calendar day shows its most telling chunk
_TI_STATE = {
    "success": "loaded",
    "failed": "failed",
    "upstream_failed": "failed",
    "running": "running",
    "queued": "running",
    "scheduled": "pending",  # waiting for a pool slot
    "up_for_retry": "running",
    "up_for_reschedule": "running",
    "restarting": "running",
    "deferred": "deferred",
    "skipped": "skipped",
    "removed": "pending",
}


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class LedgerRow:
    chunk_id: str
    start: dt.datetime
    end: dt.datetime
    rows: int
    seconds: float
    run_id: str | None
    finished_at: dt.datetime
    #: seconds the chunk waited, deferred, for the source's load / its pacing turn (None: not measured)
    waited_load_s: float | None = None
    waited_pacing_s: float | None = None
    #: what the chunk wrote of the rows it read (``rows``): inserted, updated; the rest were unchanged
    inserted: int | None = None
    updated: int | None = None


@dataclass(frozen=True)
class ChunkFailure:
    """The first line of a chunk's last error in a run, recorded by the chunk (progress_log.record_failure)."""

    chunk_id: str
    error: str
    try_number: int = 0
    final: bool = True
    failed_at: dt.datetime | None = None


@dataclass(frozen=True)
class TaskState:
    """One mapped task instance of the chunk task: its label (the chunk id) and Airflow state."""

    chunk_id: str
    state: str | None
    start_date: dt.datetime | None = None
    end_date: dt.datetime | None = None
    try_number: int = 0


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    state: str | None
    start: dt.datetime | None  # the run's range [start, end), from its plan (or its params / interval)
    end: dt.datetime | None
    granularity: str | None
    started_at: dt.datetime | None = None  # when the DAG run started (for the wall-clock rate)
    ended_at: dt.datetime | None = None
    #: the plan task's output (chunks to load, in map-index order); None before the plan ran
    descriptors: list | None = None
    #: the backfill's key (prepare/identity.py) the plan recorded; None before the plan ran (or an older plan)
    backfill_key: str | None = None


def _target(conn, spec: BackfillSpec) -> str:
    """The ledger's name for the spec's target: the resolved relation (prepare/identity.py), e.g. public.orders."""
    from airflow_backfill_provider.prepare import identity

    return identity.resolve(conn, spec.staging_target, side="destination", missing_ok=True) or str(spec.staging_target)


def read_ledger(
    conn, spec: BackfillSpec, *, backfill_key: str | None = None, dag_id: str | None = None
) -> list[LedgerRow]:
    """The ledger rows of one backfill into the spec's target, one query. The one place that knows the
    ledger's columns.

    Another backfill into the same table (another source, time column or historical split: prepare/identity.py)
    has rows there too: they are not this backfill's figures. Its rows are those of ``backfill_key`` (what
    the plan recorded); without one (before the plan ran), those written by ``dag_id``.
    """
    ledger = TableName.parse(spec.ledger_table)
    with conn.cursor() as cur:
        if not ddl.exists(cur, ledger):
            return []
        cur.execute(
            "SELECT array_agg(attname::text) FROM pg_attribute WHERE attrelid = to_regclass(%s) AND NOT attisdropped"
            " AND attname IN ('backfill_key', 'waited_load_s')",
            (sql.Identifier(*ledger.parts).as_string(cur),),
        )
        present = set(cur.fetchone()[0] or ())
        if "backfill_key" not in present:  # an older release's ledger, not migrated yet (no chunk ran since):
            return []  # its rows count as done for no backfill (ledger/table.py), so none is this backfill's
        # a ledger from before the wait columns (migrated by the next chunk): waits unknown
        waits = sql.SQL("waited_load_s, waited_pacing_s" if "waited_load_s" in present else "NULL, NULL")
        if backfill_key is not None:
            where, args = sql.SQL("backfill_key = %s"), (backfill_key,)
        elif dag_id is not None:
            where, args = sql.SQL("dag_id = %s"), (dag_id,)
        else:
            raise ValueError("read_ledger needs the backfill_key or the dag_id of the backfill")
        cur.execute(
            sql.SQL(
                "SELECT chunk_id, range_start, range_end, rows_extracted, seconds, run_id, finished_at, {waits}, "
                "rows_inserted, rows_updated "
                "FROM {t} WHERE target_table = %s AND {w}"
            ).format(t=sql.Identifier(*ledger.parts), w=where, waits=waits),
            (_target(conn, spec), *args),
        )
        return [LedgerRow(*row) for row in cur.fetchall()]


def run_totals(conn, spec: BackfillSpec, run_id: str | None, *, dag_id: str | None = None) -> tuple[int, int]:
    """(chunks, rows) the run has committed for the spec's target, from the ledger: one query.

    A run is its DAG's: ``airflow backfill create`` names runs by date alone, so two backfill DAGs into one
    table have runs of the same id (default ``dag_id``: the spec's DAG)."""
    from airflow_backfill_provider.ledger import table as ledger

    table = TableName.parse(spec.ledger_table)
    with conn.cursor() as cur:
        if not ddl.exists(cur, table):
            return 0, 0
        totals = ledger.run_totals(cur, table, _target(conn, spec), run_id, dag_id=dag_id or spec.effective_dag_id)
    conn.rollback()
    return totals


def ledger_rate(conn, spec: BackfillSpec, backfill_key: str | None = None) -> float | None:
    """Rows per second per chunk over the backfill's ledger rows (chunk seconds, not wall clock); None if none.

    ``backfill_key``: this backfill's rows only (another source into the same table has another speed);
    None: every backfill's rows into the target."""
    ledger = TableName.parse(spec.ledger_table)
    with conn.cursor() as cur:
        if not ddl.exists(cur, ledger):
            return None
        where = sql.SQL("target_table = %s") + (sql.SQL(" AND backfill_key = %s") if backfill_key else sql.SQL(""))
        cur.execute(
            sql.SQL("SELECT sum(rows_extracted), sum(seconds) FROM {t} WHERE {w}").format(
                t=sql.Identifier(*ledger.parts), w=where
            ),
            (_target(conn, spec), *((backfill_key,) if backfill_key else ())),
        )
        rows, seconds = cur.fetchone()
    conn.rollback()
    return float(rows) / seconds if rows and seconds else None


def read_failures(conn, spec: BackfillSpec, *, dag_id: str, run_id: str | None) -> list[ChunkFailure]:
    """The chunks' last recorded errors in the run (progress_log.record_failure): one query; [] without a
    failures table (no chunk has failed since this release) or a run."""
    from airflow_backfill_provider.observe.progress_log import failures_table

    table = failures_table(spec)
    if run_id is None:
        return []
    with conn.cursor() as cur:
        if not ddl.exists(cur, table):
            return []
        cur.execute(
            sql.SQL(
                "SELECT chunk_id, error, coalesce(try_number, 0), final, failed_at FROM {t}"
                " WHERE dag_id = %s AND run_id = %s"
            ).format(t=sql.Identifier(*table.parts)),
            (dag_id, run_id),
        )
        return [ChunkFailure(*row) for row in cur.fetchall()]


def read_validation(conn, spec: BackfillSpec, *, dag_id: str, run_id: str | None) -> dict | None:
    """The latest validation summary row of the run (or of the DAG when ``run_id`` is None), as a dict."""
    table = TableName.parse(spec.validation.report_table)
    with conn.cursor() as cur:
        if not ddl.exists(cur, table):
            return None
        where = sql.SQL("dag_id = %s") + (sql.SQL(" AND run_id = %s") if run_id else sql.SQL(""))
        cur.execute(
            sql.SQL(
                "SELECT run_id, validated_at, status, days, days_warn, days_fail, source_rows, destination_rows, "
                "worst_day, worst_metric, worst_diff, totals FROM {t} WHERE {w} ORDER BY validated_at DESC, id DESC LIMIT 1"
            ).format(t=sql.Identifier(*table.parts), w=where),
            (dag_id, run_id) if run_id else (dag_id,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        keys = ("run_id", "validated_at", "status", "days", "days_warn", "days_fail", "source_rows",
                "destination_rows", "worst_day", "worst_metric", "worst_diff", "totals")  # fmt: skip
        return dict(zip(keys, row, strict=True))


# ------------------------------------------------------------------------------------------ model
@dataclass
class ChunkProgress:
    """One chunk of the run. ``rows``, ``seconds``, ``inserted``/``updated`` and the waits are figures of
    THIS run only (its ledger row was written by this run); a ledger row of an earlier run (a chunk the plan
    skipped as done, or one this run has not loaded: failed, running, pending) is kept apart, in
    ``earlier_rows`` / ``earlier_run_id``, and shown as an earlier run's."""

    chunk_id: str
    start: dt.datetime
    end: dt.datetime
    state: str
    ti_state: str | None = None
    rows: int | None = None  # rows read (extracted) by this run's load of the chunk
    seconds: float | None = None
    tries: int = 0
    waited_load_s: float | None = None  # deferred for the source's load before it read (ledger)
    waited_pacing_s: float | None = None  # deferred for its pacing turn
    inserted: int | None = None  # of ``rows``: written as new rows
    updated: int | None = None  # of ``rows``: written over older versions (the rest were unchanged)
    finished_at: dt.datetime | None = None  # the ledger row's time (its transaction's start)
    earlier_run_id: str | None = None  # a ledger row of another run covers this chunk
    earlier_rows: int | None = None
    error: str | None = None  # first line of the chunk's last recorded error in this run

    @property
    def rows_per_s(self) -> float | None:
        if self.rows is None or not self.seconds:
            return None
        return self.rows / self.seconds

    @property
    def written(self) -> int | None:
        if self.inserted is None or self.updated is None:
            return None
        return self.inserted + self.updated


@dataclass
class DayCell:
    day: dt.date
    state: str
    chunks: int
    rows: int
    validation: str | None = None  # 'fail' / 'warn' when validation found this day off


@dataclass(frozen=True)
class BackfillRun:
    """One run of a backfill, as the whole-backfill view lists it (in logical-date order)."""

    run_id: str
    logical_date: dt.datetime | None
    state: str | None
    total: int
    done: int
    failed: int


@dataclass
class BackfillInfo:
    """Which backfill: Airflow 3's Backfill object (``id``), or on 2.11 the DAG's backfill-type runs (``id`` None)."""

    id: str | None
    runs: list[BackfillRun]
    state: str

    @property
    def label(self) -> str:
        return f"backfill {self.id}" if self.id is not None else "backfill-type runs"


@dataclass
class Progress:
    dag_id: str
    run: RunInfo | None
    chunks: list[ChunkProgress]
    counts: dict[str, int]
    rows_loaded: int  # rows read (extracted) and committed by this run's chunks
    rows_done: int  # loaded + skipped-as-done
    rate_rows_s: float | None  # rows read by this run per second of its load window (load_s)
    eta_s: float | None
    eta_note: str
    days: list[DayCell]
    validation: dict | None
    worst_days: list[dict] = field(default_factory=list)  # validation, worst first
    #: rows of this run's loads written as new / over older versions (None: a ledger row without the counts)
    rows_inserted: int | None = None
    rows_updated: int | None = None
    #: seconds in which this run's chunks loaded: the union of their [start, end] (parallel chunks once)
    load_s: float | None = None
    #: failed chunks' reasons: [(first error line, count, [chunk ids])], most frequent first
    failures: list[tuple[str, int, list[str]]] = field(default_factory=list)
    #: the validation thresholds the reasons are worded against (the stored report's, else the spec's)
    thresholds: tuple[float, float] | None = None
    #: set when this is a whole backfill's progress (all its runs' chunks): :func:`build_backfill`
    backfill: BackfillInfo | None = None
    #: what stops chunks from running that a user must fix (e.g. a missing pool), each naming the fix
    problems: list[str] = field(default_factory=list)

    @property
    def rows_written(self) -> int | None:
        if self.rows_inserted is None or self.rows_updated is None:
            return None
        return self.rows_inserted + self.rows_updated

    @property
    def waits(self) -> dict[str, float | int]:
        """Seconds the run's chunks waited, deferred, before reading: for the source's load, for pacing."""
        measured = [c for c in self.chunks if c.state == "loaded"]
        load = sum(c.waited_load_s or 0.0 for c in measured)
        pacing = sum(c.waited_pacing_s or 0.0 for c in measured)
        waited = sum(1 for c in measured if (c.waited_load_s or 0) > 0 or (c.waited_pacing_s or 0) > 0)
        return {"load_s": round(load, 1), "pacing_s": round(pacing, 1), "chunks_waited": waited,
                "deferred_now": self.counts["deferred"]}  # fmt: skip

    @property
    def total(self) -> int:
        return len(self.chunks)

    @property
    def done(self) -> int:
        return self.counts["loaded"] + self.counts["skipped"]

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    def to_dict(self, *, max_chunks: int | None = None) -> dict:
        """JSON for the page's API; chunks as compact columns (20k chunks stay a few hundred kB)."""
        chunks = self.chunks if max_chunks is None else self.chunks[:max_chunks]
        b = self.backfill
        return {
            "backfill": None
            if b is None
            else {
                "id": b.id,
                "state": b.state,
                "runs": [
                    {
                        "run_id": r.run_id,
                        "logical_date": _jsonable(r.logical_date),
                        "state": r.state,
                        "total": r.total,
                        "done": r.done,
                        "failed": r.failed,
                    }
                    for r in b.runs
                ],
            },  # fmt: skip
            "dag_id": self.dag_id,
            "problems": list(self.problems),
            "run_id": self.run.run_id if self.run else None,
            "run_state": self.run.state if self.run else None,
            "total": self.total,
            "done": self.done,
            "percent": round(self.percent, 1),
            "counts": self.counts,
            "rows_loaded": self.rows_loaded,
            "rows_done": self.rows_done,
            "rows_read": self.rows_loaded,
            "rows_written": self.rows_written,
            "rows_inserted": self.rows_inserted,
            "rows_updated": self.rows_updated,
            "load_s": None if self.load_s is None else round(self.load_s, 3),
            "rate_rows_s": self.rate_rows_s,
            "failures": [{"error": e, "count": n, "chunks": ids} for e, n, ids in self.failures],
            "eta_s": self.eta_s,
            "eta": format_eta(self.eta_s, self.eta_note),
            "waits": self.waits,
            "validation": _jsonable(self.validation),
            "worst_days": self.worst_days,
            "days": [[c.day.isoformat(), c.state, c.chunks, c.rows, c.validation] for c in self.days],
            "chunks": {
                "columns": [
                    "chunk_id",
                    "start",
                    "state",
                    "ti_state",
                    "rows",
                    "seconds",
                    "tries",
                    "waited_load_s",
                    "waited_pacing_s",
                    "inserted",
                    "updated",
                    "earlier_run_id",
                    "earlier_rows",
                    "error",
                ],  # fmt: skip
                "rows": [
                    [
                        c.chunk_id,
                        c.start.isoformat(),
                        c.state,
                        c.ti_state,
                        c.rows,
                        None if c.seconds is None else round(c.seconds, 3),
                        c.tries,
                        c.waited_load_s,
                        c.waited_pacing_s,
                        c.inserted,
                        c.updated,
                        c.earlier_run_id,
                        c.earlier_rows,
                        c.error,
                    ]
                    for c in chunks
                ],  # fmt: skip
            },
        }


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return value


def _ts(value) -> float:
    return value.timestamp()


def planned_chunks(spec: BackfillSpec, run: RunInfo | None) -> list[tuple[str, dt.datetime, dt.datetime]]:
    """The run's chunks as the plan cut them (before skipping done ones): pure, from the run's range."""
    if run is None or run.start is None or run.end is None:
        return []
    lo = to_datetime(run.start, spec.timezone, what="start")
    hi = to_datetime(run.end, spec.timezone, what="end")
    if hi <= lo:
        return []
    chunks = list(iter_chunks(lo, hi, run.granularity or spec.granularity, spec.timezone))
    bounds = [to_datetime(h.until, spec.timezone, what="historical.until") for h in spec.historical]
    if bounds:
        chunks = split_at(chunks, bounds)
    return [(c.chunk_id, c.start, c.end) for c in chunks]


def _iso(value) -> dt.datetime:
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))


def run_chunks(
    spec: BackfillSpec, run: RunInfo | None, ledger_rows: list[LedgerRow]
) -> list[tuple[str, dt.datetime, dt.datetime]]:
    """The run's chunks: once the plan ran, its descriptors plus the ledger rows in its range it skipped as done
    (exactly what the plan did, and no calendar arithmetic: fast for 20k chunks); before, the planner's cut."""
    if run is None or run.descriptors is None or run.start is None or run.end is None:
        return planned_chunks(spec, run)
    out = [(str(d["chunk_id"]), _iso(d["start"]), _iso(d["end"])) for d in run.descriptors if isinstance(d, dict)]
    planned = {(a.timestamp(), b.timestamp()) for _, a, b in out}
    lo, hi = _iso(run.start).timestamp(), _iso(run.end).timestamp()
    for r in ledger_rows:
        a, b = r.start.timestamp(), r.end.timestamp()
        if lo <= a and b <= hi and (a, b) not in planned:
            out.append((r.chunk_id, r.start, r.end))
    return out


def build_progress(
    spec: BackfillSpec,
    *,
    dag_id: str,
    run: RunInfo | None,
    ledger_rows: Iterable[LedgerRow],
    task_states: Iterable[TaskState],
    validation: dict | None,
    now: dt.datetime | None = None,
    failures: Iterable[ChunkFailure] = (),
) -> Progress:
    """Combine the inputs into one run's progress (see the module docstring for the states)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    ledger_rows = list(ledger_rows)
    by_range = {(_ts(r.start), _ts(r.end)): r for r in ledger_rows}
    tis = {t.chunk_id: t for t in task_states}
    errors = {f.chunk_id: f for f in failures}
    chunks: list[ChunkProgress] = []
    seen: set[str] = set()
    for chunk_id, start, end in run_chunks(spec, run, ledger_rows):
        seen.add(chunk_id)
        chunks.append(_chunk(chunk_id, start, end, tis.get(chunk_id), by_range.get((_ts(start), _ts(end))), run))
    # task instances the computed plan does not know (e.g. the range was clipped differently): still show them
    for chunk_id, ti in tis.items():
        if chunk_id not in seen:
            row = next((r for r in by_range.values() if r.chunk_id == chunk_id), None)
            start = row.start if row else (ti.start_date or now)
            end = row.end if row else start
            chunks.append(_chunk(chunk_id, start, end, ti, row, run))
    chunks.sort(key=lambda c: (_ts(c.start), c.chunk_id))
    for c in chunks:  # the reason of a chunk not loaded (a loaded one's earlier error is history)
        if c.chunk_id in errors and c.state in ("failed", "running", "pending", "deferred"):
            c.error = errors[c.chunk_id].error

    return summarize(spec, dag_id=dag_id, run=run, chunks=chunks, validation=validation)


def summarize(
    spec: BackfillSpec,
    *,
    dag_id: str,
    run: RunInfo | None,
    chunks: list[ChunkProgress],
    validation: dict | None,
    worst: list[dict] | None = None,
) -> Progress:
    """Counts, rows, load window, rate, ETA, calendar and failure groups of the chunks (one run's, or a whole
    backfill's: :func:`build_backfill`)."""
    counts = {s: 0 for s in STATES}
    for c in chunks:
        counts[c.state] += 1
    mine = [c for c in chunks if c.rows is not None]  # this run's loads (state loaded, or failed after loading)
    rows_loaded = sum(c.rows or 0 for c in mine)
    rows_done = sum(c.rows or 0 for c in chunks if c.state == "loaded")
    rows_done += sum(c.earlier_rows or 0 for c in chunks if c.state == "skipped")
    counted = all(c.written is not None for c in mine)
    load_s = _load_window(mine)
    rate, eta, note = _eta(chunks, counts, rows_loaded, load_s)
    worst = _worst_days(validation) if worst is None else worst
    return Progress(
        dag_id=dag_id,
        run=run,
        chunks=chunks,
        counts=counts,
        rows_loaded=rows_loaded,
        rows_done=rows_done,
        rate_rows_s=rate,
        eta_s=eta,
        eta_note=note,
        days=_days(spec, chunks, worst),
        validation=validation,
        worst_days=worst,
        rows_inserted=sum(c.inserted or 0 for c in mine) if counted else None,
        rows_updated=sum(c.updated or 0 for c in mine) if counted else None,
        load_s=load_s,
        failures=group_failures(chunks),
        thresholds=_thresholds(spec, validation),
    )


@dataclass(frozen=True)
class RunInputs:
    """What :func:`build_backfill` needs of one run of the backfill (read by airflow_state.collect_backfill)."""

    run: RunInfo
    logical_date: dt.datetime | None
    task_states: list[TaskState]
    failures: list[ChunkFailure] = field(default_factory=list)
    validation: dict | None = None


def backfill_state(states: Iterable[str | None]) -> str:
    """A backfill's state from its runs': running while one is queued/running, else failed if one failed."""
    states = [s or "queued" for s in states]
    if any(s in ("running", "queued") for s in states):
        return "running"
    if any(s == "failed" for s in states):
        return "failed"
    return "success" if states else "no runs"


def build_backfill(
    spec: BackfillSpec,
    *,
    dag_id: str,
    backfill_id: str | None,
    runs: Iterable[RunInputs],
    ledger_rows: Iterable[LedgerRow],
    now: dt.datetime | None = None,
) -> Progress:
    """A whole backfill's progress: every run's chunks (:func:`build_progress` per run) on one calendar, with
    the totals, load window, rate, ETA and failure reasons over all of them; its runs in logical-date order.

    A chunk two runs cover (ranges of a backfill's runs do not overlap, but a rerun may) is the one a run loaded
    or tried, the later run's; a chunk only skipped as done shows as skipped."""
    ledger_rows = list(ledger_rows)
    far = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    ordered = sorted(runs, key=lambda r: (r.logical_date or far, r.run.run_id))
    merged: dict[str, ChunkProgress] = {}
    listed: list[BackfillRun] = []
    worst: dict[str, dict] = {}
    for r in ordered:
        p = build_progress(spec, dag_id=dag_id, run=r.run, ledger_rows=ledger_rows, task_states=r.task_states,
                           validation=r.validation, now=now, failures=r.failures)  # fmt: skip
        listed.append(BackfillRun(r.run.run_id, r.logical_date, r.run.state, p.total, p.done, p.counts["failed"]))
        for c in p.chunks:
            old = merged.get(c.chunk_id)
            if old is None or c.state != "skipped" or old.state == "skipped":
                merged[c.chunk_id] = c
        for d in p.worst_days:
            worst[str(d.get("day"))] = d
    chunks = sorted(merged.values(), key=lambda c: (_ts(c.start), c.chunk_id))
    starts = [r.run.start for r in ordered if r.run.start is not None]
    ends = [r.run.end for r in ordered if r.run.end is not None]
    state = backfill_state(r.run.state for r in ordered)
    label = BackfillInfo(backfill_id, listed, state).label
    run = RunInfo(
        run_id=label,
        state=state,
        start=min(starts, key=_ts) if starts else None,
        end=max(ends, key=_ts) if ends else None,
        granularity=next((r.run.granularity for r in ordered if r.run.granularity), None),
        started_at=min((r.run.started_at for r in ordered if r.run.started_at), key=_ts, default=None),
        backfill_key=next((r.run.backfill_key for r in ordered if r.run.backfill_key), None),
    )
    ranked = sorted(worst.values(), key=lambda d: (d.get("status") != "fail", str(d.get("day"))))
    p = summarize(spec, dag_id=dag_id, run=run, chunks=chunks, validation=None, worst=ranked)
    p.backfill = BackfillInfo(backfill_id, listed, state)
    return p


def group_failures(chunks: Iterable[ChunkProgress]) -> list[tuple[str, int, list[str]]]:
    """Failed chunks grouped by the first line of their error, most frequent first; a failed chunk with no
    recorded error (killed, or failed before it could record one) is grouped as such."""
    groups: dict[str, list[str]] = {}
    for c in chunks:
        if c.state == "failed":
            groups.setdefault(c.error or NO_REASON, []).append(c.chunk_id)
    return sorted(((e, len(ids), ids) for e, ids in groups.items()), key=lambda g: (-g[1], g[0] == NO_REASON, g[0]))


NO_REASON = "no reason recorded (see the chunk's task log)"


def _thresholds(spec: BackfillSpec, validation: dict | None) -> tuple[float, float]:
    stored = ((validation or {}).get("totals") or {}).get("thresholds") or {}
    return (
        float(stored.get("warn", spec.validation.warn_threshold)),
        float(stored.get("fail", spec.validation.fail_threshold)),
    )


def _chunk(chunk_id, start, end, ti: TaskState | None, row: LedgerRow | None, run: RunInfo | None) -> ChunkProgress:
    mine = row is not None and run is not None and row.run_id == run.run_id  # written by this run
    if ti is not None and ti.state:
        state = _TI_STATE.get(ti.state, "pending")
    elif row is not None:
        # no task instance for it in this run: the plan skipped it as done, unless this run wrote it
        state = "loaded" if mine else "skipped"
    else:
        state = "pending"
    theirs = row if row is not None and not mine else None
    return ChunkProgress(
        chunk_id,
        start,
        end,
        state,
        ti.state if ti else None,
        row.rows if mine and row else None,
        row.seconds if mine and row else None,
        ti.try_number if ti else 0,
        row.waited_load_s if mine and row else None,
        row.waited_pacing_s if mine and row else None,
        inserted=row.inserted if mine and row else None,
        updated=row.updated if mine and row else None,
        finished_at=row.finished_at if mine and row else None,
        earlier_run_id=theirs.run_id if theirs else None,
        earlier_rows=theirs.rows if theirs else None,
    )


def _load_window(chunks: list[ChunkProgress]) -> float | None:
    """Seconds in which the chunks loaded: the union of their intervals, so parallel chunks count once and
    the time between a clear and the retry (or before the first chunk, waiting for a slot) not at all.

    A ledger row's ``finished_at`` is its transaction's ``now()`` (the transaction's start, just after the
    chunk connected): the chunk ran about [finished_at, finished_at + seconds]."""
    spans = sorted((_ts(c.finished_at), _ts(c.finished_at) + c.seconds) for c in chunks
                   if c.finished_at is not None and c.seconds)  # fmt: skip
    if not spans:
        return None
    total, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            total, lo = total + hi - lo, a
        hi = max(hi, b)
    return total + hi - lo


def _eta(chunks, counts, rows_loaded, load_s) -> tuple[float | None, float | None, str]:
    """Rate = rows this run read per second of its load window (:func:`_load_window`); ETA = rows left / rate.

    Rows left are estimated from the mean rows of the chunks loaded so far (chunks are calendar slices,
    so this is a per-period mean). Parallel chunks are measured together (the window, not the sum of chunk
    seconds); a pause (a clear, waiting for a pool slot) is not load time.
    """
    remaining = counts["pending"] + counts["running"] + counts["deferred"]
    loaded = [c for c in chunks if c.rows is not None]
    rate = rows_loaded / load_s if load_s and rows_loaded else None
    if remaining == 0:
        note = f"{counts['failed']} failed chunk(s) to clear" if counts["failed"] else "done"
        return rate, 0.0 if not counts["failed"] else None, note
    if not loaded or not rate:
        return rate, None, "no chunk loaded yet: no rate to extrapolate" if not loaded else "no rate yet"
    mean_rows = sum(c.rows for c in loaded) / len(loaded)
    eta = remaining * mean_rows / rate
    note = f"{remaining} chunk(s) left at {rate:,.0f} rows/s"
    if counts["failed"]:
        note += f"; {counts['failed']} failed chunk(s) need a clear"
    return rate, eta, note


def _worst_days(validation: dict | None) -> list[dict]:
    """Validation's non-passing days, worst first (the summary row stores them ranked)."""
    if not validation:
        return []
    totals = validation.get("totals") or {}
    return list(totals.get("days_not_passing") or [])


def _days(spec: BackfillSpec, chunks: list[ChunkProgress], worst: list[dict]) -> list[DayCell]:
    """One calendar cell per local day a chunk covers; a day shows its most telling chunk's state."""
    tz = ZoneInfo(spec.timezone)  # stdlib conversions: pendulum's cost seconds for 20k chunks
    cells: dict[dt.date, DayCell] = {}
    for c in chunks:
        a, b = c.start.timestamp(), c.end.timestamp()
        first = dt.datetime.fromtimestamp(a, tz).date()
        last = dt.datetime.fromtimestamp(b - 1e-6, tz).date() if b > a else first
        ndays = (last - first).days + 1
        for i in range(ndays):
            day = first + dt.timedelta(days=i)
            cell = cells.get(day)
            if cell is None:
                cells[day] = cell = DayCell(day, c.state, 0, 0)
            elif _RANK[c.state] < _RANK[cell.state]:
                cell.state = c.state
            cell.chunks += 1
            done = c.rows if c.rows is not None else (c.earlier_rows if c.state == "skipped" else None)
            if done and i == 0:
                cell.rows += done
    for d in worst:
        try:
            day = dt.date.fromisoformat(str(d.get("day")))
        except ValueError:
            continue
        if day in cells:
            cells[day].validation = d.get("status")
    return [cells[k] for k in sorted(cells)]


# ------------------------------------------------------------------------------------------ text
def missing_pool_problem(p: Progress, pool: str) -> None:
    """Record on ``p`` that the chunks' Airflow pool does not exist: the scheduler leaves them 'scheduled'
    (pending here) forever and Airflow only says so in its scheduler log. The ETA then names the cause."""
    fix = f'airflow pools set {pool} 4 "source slots for backfills" --include-deferred'
    p.problems.append(
        f"The Airflow pool {pool!r} (spec key 'pool') does not exist: chunks stay 'scheduled' until it does. "
        f"Create it: {fix}"
    )
    if p.counts["pending"]:
        p.eta_s, p.eta_note = None, f"pool {pool!r} missing: {p.counts['pending']} chunk(s) cannot start"


def format_eta(seconds: float | None, note: str = "") -> str:
    if seconds is None:
        return f"unknown ({note})" if note else "unknown"
    if seconds == 0:
        return note or "done"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_text(p: Progress, *, worst: int = 10) -> str:
    """What ``python -m airflow_backfill_provider status`` prints."""
    lines = []
    run = p.run
    b = p.backfill
    if b is not None:
        lines.append(f"{p.dag_id}  {b.label}: {len(b.runs)} run(s)  ({b.state})")
    else:
        lines.append(f"{p.dag_id}  run {run.run_id if run else '-'}  ({run.state if run else 'no run'})")
    lines += [f"PROBLEM: {problem}" for problem in p.problems]
    if run and run.start is not None and run.end is not None:
        lines.append(f"range [{run.start.isoformat()}, {run.end.isoformat()})  {run.granularity or ''}")
    lines.append(
        f"chunks: {p.done}/{p.total} done ({p.percent:.0f}%)  "
        + "  ".join(f"{s} {p.counts[s]}" for s in STATES if p.counts[s])
    )
    lines.append(f"rows: {rows_summary(p)}; {p.rows_done:,} done in range; rate {rate_summary(p)}")
    lines.append(f"ETA: {format_eta(p.eta_s, p.eta_note)}")
    w = p.waits
    lines.append(
        f"waits: {w['load_s']:,.1f} s for the source's load, {w['pacing_s']:,.1f} s for pacing "
        f"({w['chunks_waited']} loaded chunk(s) waited)"
    )
    failed = [c for c in p.chunks if c.state == "failed"]
    if failed:
        lines.append(
            "failed chunks: " + ", ".join(c.chunk_id for c in failed[:20]) + (" ..." if len(failed) > 20 else "")
        )
        lines.append("why they failed (first line of each error, identical ones grouped):")
        for error, n, ids in p.failures[:10]:
            lines.append(f"  {n} x {error}  [{', '.join(ids[:5])}{' ...' if n > 5 else ''}]")
        if len(p.failures) > 10:
            lines.append(f"  ... and {len(p.failures) - 10} other error(s) (--json lists every chunk's)")
    waiting = [c for c in p.chunks if c.state == "deferred"]
    if waiting:
        lines.append(f"waiting for the source (deferred): {len(waiting)} chunk(s): "
                     + ", ".join(c.chunk_id for c in waiting[:10]))  # fmt: skip
    if b is not None:
        lines.append("runs (logical date order):")
        for r in b.runs:
            when = r.logical_date.isoformat() if r.logical_date else "-"
            nfail = f", {r.failed} failed" if r.failed else ""
            lines.append(f"  {when}  {r.run_id}  ({r.state or '-'})  {r.done}/{r.total} chunks done{nfail}")
    v = p.validation
    if b is not None and p.worst_days:
        lines.append("validation, days not passing in this backfill's runs:")
        for d in p.worst_days[:worst]:
            lines.append(f"  {d['day']}  {str(d['status']).upper():4}  {day_reason_of(d, p.thresholds or (0.0, 0.0))}")
    elif b is not None:
        lines.append("validation: no failing or warning day in this backfill's runs")
    elif v:
        lines.append(
            f"validation ({v.get('run_id')}): {str(v['status']).upper()}, {v['days']} day(s), "
            f"{v['days_warn']} warn, {v['days_fail']} fail; source {v['source_rows']:,} rows, "
            f"destination {v['destination_rows']:,}"
        )
        if p.worst_days:
            lines.append("worst days:")
            for d in p.worst_days[:worst]:
                lines.append(
                    f"  {d['day']}  {str(d['status']).upper():4}  src {d.get('source_rows')}  dst "
                    f"{d.get('destination_rows')}  {day_reason_of(d, p.thresholds or (0.0, 0.0))}"
                )
    else:
        lines.append("validation: not run yet")
    return "\n".join(lines)


def _pct(x: float) -> str:
    if not math.isfinite(x):  # validate.relative_diff: NaN or an infinity against a different value
        return "NaN or Infinity against a different value"
    return f"{x * 100:.2f}%"


def day_reason(diffs: dict, status: str, warn: float, fail: float) -> str:
    """Why validation gave a day its status, in words: the ONE wording of a validation reason, used by the
    validate task's log and failure message, the progress page and the ``status`` command.

    ``diffs``: metric ("rows", "sum(col)") -> relative difference, plus "checksum" (0.0 equal, 1.0 differs);
    ``status``: the day's ("pass", "warn", "fail"); ``warn``/``fail``: the thresholds it was judged by.
    Names the metrics over the threshold that gave the status, and the checksum when it differs; a sum under
    the threshold is named as such, never as the reason.
    """
    measured = {m: float(x) for m, x in diffs.items() if m != "checksum"}
    checksum = bool(diffs.get("checksum"))
    limit, name = (fail, "fail") if status == "fail" else (warn, "warn")
    over = sorted(((m, x) for m, x in measured.items() if x > limit), key=lambda mx: (-mx[1], mx[0]))
    largest = max(((m, x) for m, x in measured.items() if x > 0), key=lambda mx: mx[1], default=None)
    under = f"{largest[0]} off by {_pct(largest[1])}" if largest else None
    if status == "pass" or (not over and not checksum):
        if status == "pass":
            return f"within thresholds ({under})" if under else "equal"
        return f"{under} (over {name}_threshold {_pct(limit)})" if under else status
    parts = [f"{m} off by {_pct(x)}" for m, x in over]
    reason = ", ".join(parts) + f" (over {name}_threshold {_pct(limit)})" if parts else ""
    if checksum:
        if reason:
            reason += "; the checksum of the loaded columns differs too"
        else:
            reason = "checksum of the loaded columns differs: a value differs " + (
                f"(counts and sums within thresholds: {under})" if under else "(counts and sums are equal)"
            )
    return reason


def day_reason_of(d: dict, thresholds: tuple[float, float]) -> str:
    """:func:`day_reason` of a stored non-passing day (the validation summary's ``days_not_passing``)."""
    return day_reason(d.get("diffs") or {}, str(d.get("status")), *thresholds)


def rows_summary(p: Progress) -> str:
    """``215,400 read by this run, 0 written (0 inserted, 0 updated, 215,400 unchanged)``: read vs written."""
    text = f"{p.rows_loaded:,} read by " + ("this backfill's runs" if p.backfill is not None else "this run")
    written = p.rows_written
    if written is None:
        return text + ", written unknown (ledger rows without the counts)"
    return (f"{text}, {written:,} written ({p.rows_inserted:,} inserted, {p.rows_updated:,} updated, "
            f"{p.rows_loaded - written:,} unchanged)")  # fmt: skip


def rate_summary(p: Progress) -> str:
    """``140 rows/s read over 2.9 s of loading``: rows read per second of the run's load window."""
    if not p.rate_rows_s or not p.load_s:
        return "-"
    return f"{p.rate_rows_s:,.0f} rows/s read over {p.load_s:,.1f} s of loading"
