"""From a DAG run to the list of chunks to load: range resolution, watermark, ledger, historical splits.

Kept out of the operator so it can be tested without Airflow: ``resolve_range`` takes plain values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pendulum

from airflow_backfill_provider.core import timebounds
from airflow_backfill_provider.ledger import table as ledger
from airflow_backfill_provider.plan import checks
from airflow_backfill_provider.prepare import catalog as schema, facts, source, swap, watermark
from airflow_backfill_provider.core.chunks import Chunk, check_granularity, clip_end, split_at, to_datetime, utc
from airflow_backfill_provider.core.exceptions import PlanError, WatermarkError
from airflow_backfill_provider.prepare.identity import BackfillIdentity
from airflow_backfill_provider.core.spec import BackfillSpec, TableName

log = logging.getLogger(__name__)

#: the plan only reads catalogs and statistics: a source that cannot answer in 30 s is too busy to backfill
PLAN_STATEMENT_TIMEOUT_S = 30


@dataclass
class Plan:
    start: pendulum.DateTime
    end: pendulum.DateTime
    granularity: str
    chunks: list[Chunk]
    skipped: list[Chunk] = field(default_factory=list)
    watermark: pendulum.DateTime | None = None
    clipped: bool = False
    notes: list[str] = field(default_factory=list)
    #: the backfill's identity (prepare/identity.py), when the plan read it: chunks carry it (facts.PreparedRun) and the
    #: progress page selects its ledger rows by its key
    backfill: BackfillIdentity | None = None

    @property
    def backfill_key(self) -> str | None:
        return self.backfill.key if self.backfill is not None else None

    def summary(self, dry_run: bool = False) -> dict:
        """The small dict the plan task pushes to XCom (key 'plan') for validation and humans."""
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "granularity": self.granularity,
            "chunks": len(self.chunks),
            "skipped_done": len(self.skipped),
            "watermark": self.watermark.isoformat() if self.watermark else None,
            "clipped": self.clipped,
            "dry_run": dry_run,
            "backfill_key": self.backfill_key,
        }


def resolve_range(
    spec: BackfillSpec,
    *,
    param_start,
    param_end,
    run_type: str,
    interval_start,
    interval_end,
) -> tuple[pendulum.DateTime, pendulum.DateTime]:
    """Params win when given; scheduled/backfill runs use their data interval; a bare manual run is an error.

    A backfill run with ``start``/``end`` is refused, not served: a backfill gives every run the same conf,
    so each run would load the same range; ignoring them would instead load ranges other than the user typed.
    """
    if run_type == "backfill" and (param_start or param_end):
        raise PlanError(
            f"a backfill run loads its own data interval, but the params start={param_start!r} and "
            f"end={param_end!r} are set, and every run of the backfill gets the same ones (each run would load "
            "that range again). Leave start and end empty in backfill mode (the Backfill form, or "
            "--dag-run-conf without them): the backfill's from/to dates choose the range; or trigger one manual "
            "run with start and end instead of a backfill"
        )
    if param_start or param_end:
        if not (param_start and param_end):
            missing = "end" if param_start else "start"
            raise PlanError(f"param {missing!r} is empty: give both start and end (YYYY-MM-DD, end exclusive)")
        return (
            to_datetime(param_start, spec.timezone, what="start"),
            to_datetime(param_end, spec.timezone, what="end"),
        )
    if run_type != "manual" and interval_start is not None and interval_end is not None:
        lo = to_datetime(interval_start, spec.timezone, what="data_interval_start")
        hi = to_datetime(interval_end, spec.timezone, what="data_interval_end")
        if utc(hi) <= utc(lo):  # instants: on a fall-back night 01:00-04:00 == 01:00-05:00 by wall clock
            raise PlanError(
                f"data interval [{lo}, {hi}) is empty; the DAG's timetable must be a data-interval timetable "
                "(the factory uses CronDataIntervalTimetable; a plain '@daily' gives zero-width intervals on Airflow 3)"
            )
        return lo, hi
    raise PlanError(
        "a manual run needs the params 'start' and 'end' (YYYY-MM-DD, end exclusive): fill them in the trigger "
        'form, or pass --conf \'{"start": "2024-01-01", "end": "2024-02-01"}\''
    )


def build_plan(
    spec: BackfillSpec,
    start,
    end,
    *,
    granularity: str | None = None,
    reprocess: bool = False,
    dst_conn=None,
    src_conn=None,
) -> Plan:
    """Chunks for ``[start, end)``; with a destination connection: clip to the watermark and skip done chunks.

    Skipping needs the backfill's identity, read on the source too: ``src_conn``, else a short
    read-only session on ``spec.source_conn_id`` is opened for it. With a source connection: size
    chunks from its statistics (``granularity: auto``, ``chunk_by: key``) and add advice on the chosen
    size and the table's physical order to the notes (plan/chunkplan.py).
    """
    granularity = granularity or spec.granularity
    if granularity != "auto":
        check_granularity(granularity)  # also with chunk_by: key (which ignores it): refuse junk params
    lo = to_datetime(start, spec.timezone, what="start")
    hi = to_datetime(end, spec.timezone, what="end")
    if utc(hi) <= utc(lo):  # instants: on a fall-back night 01:00-04:00 == 01:00-05:00 by wall clock
        raise PlanError(f"end ({hi.date()}) must be after start ({lo.date()}); the range is [start, end)")
    notes: list[str] = []
    wm = None
    clipped = False
    if dst_conn is not None and spec.watermark.enabled:
        raw = watermark.read_watermark(dst_conn, TableName.parse(spec.watermark.table), spec.destination)
        if raw is not None:
            wm = pendulum.instance(raw).in_timezone(spec.timezone)
            if utc(hi) > utc(wm):
                if spec.watermark.policy == "refuse":
                    raise WatermarkError(
                        f"range end {hi.isoformat()} is after the live watermark {wm.isoformat()} of "
                        f"{spec.destination}; end the range at or before it, or set watermark.policy: clip"
                    )
                clipped = True
                notes.append(f"end clipped from {hi.isoformat()} to the live watermark {wm.isoformat()}")
                hi = clip_end(hi, wm)
                if utc(hi) <= utc(lo):  # instants: on a fall-back night 01:00-04:00 == 01:00-05:00 by wall clock
                    notes.append("the whole range is at or after the live watermark: nothing to backfill")
                    return Plan(lo, lo, granularity, [], [], wm, True, notes)
    from airflow_backfill_provider.plan import chunkplan

    chunks, granularity = chunkplan.make_chunks(spec, lo, hi, granularity, notes, src_conn=src_conn, dst_conn=dst_conn)
    bounds = [to_datetime(h.until, spec.timezone, what="historical.until") for h in spec.historical]
    if bounds:
        chunks = split_at(chunks, bounds)
    skipped: list[Chunk] = []
    backfill = None
    if dst_conn is not None and not reprocess and ledger.is_current(dst_conn, TableName.parse(spec.ledger_table)):
        # covered by the union of this backfill's ledger ranges, whatever chunking loaded them (ledger/coverage.py)
        backfill = _identity(spec, src_conn, dst_conn)
        done = chunkplan.done_coverage(spec, dst_conn, backfill=backfill)
        todo: list[Chunk] = []
        for c in chunks:
            (skipped if chunkplan.is_done(done, c) else todo).append(c)
        chunks = todo
        if skipped:
            notes.append(f"{len(skipped)} chunk(s) already in the ledger skipped (set reprocess to load them again)")
        notes += _stale_claims(spec, dst_conn, backfill, todo)
    if backfill is None and dst_conn is not None and src_conn is not None:
        # no ledger yet, or reprocess: still recorded (the progress page selects the ledger rows by it)
        from airflow_backfill_provider.core.exceptions import PermanentChunkError

        try:
            backfill = _identity(spec, src_conn, dst_conn)
        except PermanentChunkError:  # e.g. a missing source table: the plan's pre-flight names it, not this
            pass
    return Plan(lo, hi, granularity, chunks, skipped, wm, clipped, notes, backfill)


def _stale_claims(spec: BackfillSpec, dst_conn, backfill, todo: list[Chunk]) -> list[str]:
    """Why chunks the ledger records under an earlier description of this backfill are loaded again: the
    ledger is a record of what was written, verified against the destination and spec as they are now."""
    from airflow_backfill_provider.ledger import coverage
    from airflow_backfill_provider.plan import chunkplan
    from airflow_backfill_provider.prepare import identity

    if not todo:
        return []
    out = []
    claims = ledger.other_claims(
        dst_conn, TableName.parse(spec.ledger_table), backfill, key_column=spec.effective_key_column
    )
    for description, rects in claims:
        why = identity.explain(description, backfill.description)
        if why is None:
            continue
        done = coverage.Coverage(rects)
        n = sum(1 for c in todo if chunkplan.is_done(done, c))
        if n:
            out.append(f"{n} chunk(s) the ledger records as loaded are not counted as done, and load again: {why}")
    return out


def _identity(spec: BackfillSpec, src_conn, dst_conn):
    """The backfill's identity (``identity.of``), on ``src_conn`` or a short read-only source session."""
    from airflow_backfill_provider.prepare import identity
    from airflow_backfill_provider.connections import close_all, open_source

    if src_conn is not None:
        return identity.of(spec, src_conn, dst_conn)
    own = open_source(spec, f"backfill:{spec.effective_dag_id}:plan", statement_timeout_s=PLAN_STATEMENT_TIMEOUT_S)
    try:
        return identity.of(spec, own, dst_conn)
    finally:
        own.rollback()
        close_all(own)


def preflight(spec: BackfillSpec, plan: Plan, src_conn, dst_conn) -> list[tuple[int, str]]:
    """Catalog checks before any chunk writes, once per source range: tables, columns, unique key and drift
    decisions (against the live table in swap mode: the parallel one is created LIKE it), the granularity
    against the time column's type, an index on the column the range filters, NULL time rows.

    Raises what a chunk would raise (PermanentChunkError, PlanError); returns (log level, line) to log.
    """
    lines: list[tuple[int, str]] = []
    for chunk in source.one_per_source(spec, plan.chunks):
        read = facts.read(swap.as_live(spec), src_conn, dst_conn, chunk, prints=False)
        src_table, cplan = facts.plan_from(swap.as_live(spec), read, chunk)
        if not lines and (coarse := coarse_version(spec, cplan)):
            lines.append((logging.WARNING, coarse))
        timebounds.check_granularity(cplan.filter_kind, plan.granularity, column=spec.time_column)  # a param override
        lines += [
            (logging.INFO, f"Schema decision for {chunk.chunk_id} (from {src_table}): {d}") for d in cplan.decisions
        ]
        column = cplan.time_filter_column  # historical mode may filter on another column (created_at: created)
        if column is None:
            expr = cplan.time_filter.as_string(src_conn) if cplan.time_filter is not None else spec.time_column
            lines.append(
                (
                    logging.WARNING,
                    f"Source {src_table}: chunks from {chunk.chunk_id} filter on the expression {expr}; without an "
                    "index on exactly that expression every chunk scans the whole table. NULL time values are not "
                    "counted for an expression: rows where it is NULL are in no chunk.",
                )
            )
            continue
        indexed = schema.time_column_indexed(src_conn, src_table, column)
        if not indexed:
            lines.append(
                (
                    logging.WARNING,
                    f"Source {src_table} has no index leading on {column}: every chunk will scan the whole table. "
                    "Ask the source's owner for an index on it, or use a coarser granularity.",
                )
            )
        # without an index an exact count would scan the table: use the planner's estimate
        warning = checks.null_time_rows(src_conn, src_table, column, exact=indexed).message
        if warning:
            lines.append((logging.WARNING, warning))
    return lines


def coarse_version(spec: BackfillSpec, cplan) -> str | None:
    """A warning when the version column ties often: a ``date`` (or whole-second timestamp) version makes
    two writes of one day (second) equal, and on a tie with different content the upsert cannot tell which
    is newer: the backfill's copy rewrites the row, possibly over live ingest's later write."""
    v = spec.version_column
    if not v or v not in cplan.columns:
        return None
    type_sql = cplan.types[cplan.columns.index(v)]
    if type_sql == "date":
        unit = "day"
    elif type_sql.startswith(("timestamp(0)", "time(0)")):
        unit = "second"
    else:
        return None
    return (
        f"version_column {v!r} is {type_sql}: two versions of a row within one {unit} are equal, and on such a tie "
        "with different content the backfill's copy wins (it may overwrite a later write of live ingest made the "
        f"same {unit}). Prefer a finer version column (timestamptz with microseconds, or a counter); see "
        "docs/live-and-swap.md"
    )
