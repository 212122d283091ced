"""The backfill spec: one typed, validated description of a table backfill.

Validated once (pydantic). Every error names the offending key and the valid choices, and is raised
before anything touches a database. Table and column names are kept as plain strings here and are
only ever turned into SQL through ``psycopg2.sql.Identifier`` (see ``core/sql.py``).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from airflow_backfill_provider.core.chunks import DEFAULT_MAX_CHUNKS, check_timezone
from airflow_backfill_provider.core.dsn import dsn_has_password, password_dsn_message
from airflow_backfill_provider.core.exceptions import PlanError, SpecError

_DAG_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _check_dag_id(v: str | None) -> str | None:
    if v is not None and not _DAG_ID.match(v):
        raise ValueError(f"{v!r} may only contain letters, digits, '_', '.', '-'")
    return v


class TableName(BaseModel):
    """A possibly schema-qualified table name, split once: ``sales.orders`` -> (sales, orders)."""

    model_config = ConfigDict(frozen=True)
    schema_: str | None = None
    name: str

    @classmethod
    def parse(cls, value: str | dict | "TableName") -> "TableName":
        if isinstance(value, TableName):
            return value
        if isinstance(value, dict):  # {"schema": "...", "name": "..."} keeps dots in names possible
            return cls(schema_=value.get("schema"), name=value["name"])
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a table name such as 'orders' or 'public.orders'")
        if "." in value:
            schema, _, name = value.partition(".")
            return cls(schema_=schema, name=name)
        return cls(name=value)

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.schema_, self.name) if self.schema_ else (self.name,)

    def __str__(self) -> str:
        return ".".join(self.parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ThrottleSpec(_Strict):
    """Source protection. See docs/source-protection.md."""

    #: active (non-idle) sessions on the source database, ours excluded, above which a chunk waits (deferred)
    max_active: int = Field(8, ge=1)
    #: above this many active sessions a chunk fails at once and is not retried (gh-ost's critical-load)
    critical_active: int | None = Field(None, ge=1)
    #: replica lag in seconds above which a chunk waits (only when the source is a standby)
    max_replica_lag: float | None = Field(None, gt=0)
    #: minimum seconds between two source queries of the same pool slot (pacing); 0 disables
    min_query_interval: float = Field(0.0, ge=0)
    #: give up waiting for the load to drop after this many seconds
    max_wait: float = Field(3600.0, gt=0)
    #: first re-probe interval while waiting; doubles up to poll_max
    poll_interval: float = Field(5.0, gt=0)
    poll_max: float = Field(60.0, gt=0)
    #: no chunk resumes sooner than this after deferring: a load or maintenance wait (end unknown) carries it as
    #: its trigger's floor; a pacing turn or window opening nearer than this is waited in the worker instead.
    #: A faster resume races Airflow's scheduler: the worker reports the deferring process's exit up to
    #: [workers] min_heartbeat_interval (5 s) later, and a scheduler that sees that report after the chunk was
    #: queued again fails the chunk as "killed externally" (a retry and its retry_delay; apache/airflow#67287,
    #: #72716). Keep it above min_heartbeat_interval plus a scheduler loop or two.
    min_defer_s: float = Field(8.0, ge=0)
    #: pacing slots sharing min_query_interval (set it to the pool's slot count: "per pool slot")
    pacing_slots: int = Field(1, ge=1)
    #: destination table holding the pacing reservations (created on first use)
    pacing_table: str = "public.backfill_pacing"
    #: wait while the source server's transaction latency exceeds this many times its quiet
    #: baseline (throttle/loadsignal.py); off when None (``null`` in YAML). On by default: a chunk samples a
    #: start_window_s window before it reads, and its read is watched on the same signal (watch_reads).
    max_latency_ratio: float | None = Field(1.5, gt=1)
    #: seconds the latency signal is averaged over, while a chunk reads (watch_reads) and at each re-probe
    load_window_s: float = Field(2.0, gt=0, le=30)
    #: the window sampled before a chunk starts reading, when watch_reads keeps watching its read with
    #: load_window_s windows; it is rated against the baseline but does not lower it (a short window's
    #: minimum would be biased low)
    start_window_s: float = Field(0.5, gt=0, le=30)
    #: keep watching the source while a chunk reads, and pause the read (stop draining the COPY pipe:
    #: the source backend then waits on its socket) while the load is over the limits (transfer/pipe.py, throttle/probe.py)
    watch_reads: bool = True
    #: how often the watch checks the source while a chunk reads (a latency window runs back to back)
    read_check_s: float = Field(1.0, gt=0, le=60)
    #: the longest a chunk's read may be paused in total; the read then goes on to its end. Pauses also
    #: stop once half of statement_timeout_s has passed since the read began (a paused COPY is still running)
    max_pause_s: float = Field(60.0, ge=0)
    #: the source's quiet transaction latency in ms; default: the lowest seen, kept in baseline_table
    latency_baseline_ms: float | None = Field(None, gt=0)
    #: destination table holding the learned baselines, one row per source connection (created on first use)
    baseline_table: str = "public.backfill_load_baseline"
    #: databases on the source's server whose sessions the latency signal leaves out, as it leaves out the
    #: backfill's own: Airflow's metadata database when it shares the server (named here: an Airflow 3 task
    #: cannot see where the metadata database is)
    ignore_databases: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _critical_above_max(self):
        if self.critical_active is not None and self.critical_active <= self.max_active:
            raise ValueError(
                f"throttle.critical_active ({self.critical_active}) must be greater than "
                f"throttle.max_active ({self.max_active})"
            )
        if self.poll_max < self.poll_interval:
            raise ValueError(
                f"throttle.poll_max ({self.poll_max}) must be >= throttle.poll_interval ({self.poll_interval})"
            )
        TableName.parse(self.pacing_table)
        return self

    @field_validator("baseline_table")
    @classmethod
    def _baseline_table(cls, v: str) -> str:
        TableName.parse(v)
        return v


class WatermarkSpec(_Strict):
    """Where live ingest keeps its watermark (read-only for the backfill)."""

    table: str = "public.backfill_watermarks"
    #: 'clip': end the backfill at the watermark; 'refuse': fail the plan if the range crosses it
    policy: Literal["clip", "refuse"] = "clip"
    enabled: bool = True


class LiveSpec(_Strict):
    """Live ingest (incremental) for the same table: a second DAG that owns the watermark.

    Each run reads source rows with ``cursor_column > watermark - lookback_s``, upserts them newer-wins
    into the live (destination) table and advances the watermark, in one destination transaction.
    """

    enabled: bool = False
    #: cron for the live DAG (default: every 5 minutes)
    schedule: str = "*/5 * * * *"
    #: re-read this many seconds below the watermark each run: covers source transactions that commit
    #: after a later-stamped one (set it above your longest source write transaction)
    lookback_s: float = Field(300.0, ge=0)
    #: the incremental column; default: version_column, else time_column (append-only tables)
    cursor_column: str | None = None
    #: the first run's watermark when none is stored; default: the source's now() at that first run
    start_from: dt.datetime | None = None
    dag_id: str | None = None

    _dag_id = field_validator("dag_id")(classmethod(lambda cls, v: _check_dag_id(v)))


class ValidationSpec(_Strict):
    """Per-day source/destination comparison at the end of a run."""

    enabled: bool = True
    sum_columns: list[str] = Field(default_factory=list)
    warn_threshold: float = Field(0.001, ge=0)
    fail_threshold: float = Field(0.01, ge=0)
    report_table: str = "public.backfill_validation"
    #: per-day checksum of every loaded column: a day whose checksum differs 'fail's (default) or 'warn's;
    #: 'off' skips it (e.g. destination triggers or defaults legitimately change loaded rows)
    checksum: Literal["fail", "warn", "off"] = "fail"

    @field_validator("checksum", mode="before")
    @classmethod
    def _checksum_bool(cls, v):
        return {True: "fail", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _order(self):
        if self.fail_threshold < self.warn_threshold:
            raise ValueError(
                f"validation.fail_threshold ({self.fail_threshold}) must be >= "
                f"validation.warn_threshold ({self.warn_threshold})"
            )
        return self


class HistoricalRange(_Strict):
    """Historical schema mode: before ``until`` read another table and/or other column expressions.

    Expressions are SQL written by the spec author (never by DAG params); each must produce the
    destination column of the same name.
    """

    until: dt.date | dt.datetime
    source_table: str | None = None
    column_expressions: dict[str, str] = Field(default_factory=dict)

    @field_validator("source_table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        if v is not None:
            TableName.parse(v)
        return v

    @field_validator("column_expressions")
    @classmethod
    def _expressions(cls, v: dict[str, str]) -> dict[str, str]:
        # Trusted SQL, but one expression must stay one expression: a ';' would end the statement and a
        # comment would swallow the chunk's WHERE clause (every chunk would read the whole table).
        for column, expr in v.items():
            if not isinstance(expr, str) or not expr.strip():
                raise ValueError(f"column_expressions[{column!r}] must be a non-empty SQL expression")
            bad = [tok for tok in (";", "--", "/*") if tok in expr]
            if bad:
                raise ValueError(
                    f"column_expressions[{column!r}] = {expr!r} contains {bad}: write one SQL expression, "
                    "without ';' or comments (put comments in the YAML with #)"
                )
        return v


class WindowsSpec(_Strict):
    """Maintenance windows (docs/chunking.md): when chunks may start, and waiting out VACUUM/ANALYZE.

    ``allowed``: daily ranges ``"HH:MM-HH:MM"`` (seconds optional; may wrap midnight) in which a chunk
    may start; empty means any time. ``blackout``: daily ranges, or absolute ones
    ``"YYYY-MM-DDTHH:MM/YYYY-MM-DDTHH:MM"``, in which no chunk starts. Outside, a chunk defers (no worker
    slot) until the window opens. ``wait_for_maintenance``: while the source table is being vacuumed or
    analyzed, a chunk defers, bounded by ``throttle.max_wait`` like the load wait.
    """

    allowed: list[str] = Field(default_factory=list)
    blackout: list[str] = Field(default_factory=list)
    #: IANA timezone of the windows; default: the spec's timezone
    timezone: str | None = None
    wait_for_maintenance: bool = True

    @model_validator(mode="after")
    def _parse(self):
        from airflow_backfill_provider.throttle.windows import parse_windows

        parse_windows(self.allowed, self.blackout, self.timezone or "UTC")  # raises naming the bad entry
        return self


class BackfillSpec(_Strict):
    """Everything needed to backfill one table. Build with :func:`load_spec` for readable errors."""

    name: str
    dag_id: str | None = None
    source_conn_id: str
    destination_conn_id: str
    source_table: str
    destination_table: str
    time_column: str
    key_columns: list[str] = Field(min_length=1)
    version_column: str | None = None
    columns: list[str] | None = None
    granularity: Literal["hour", "day", "week", "month", "auto"] = "day"
    #: 'time': calendar chunks of time_column; 'key': half-open ranges of an integer key (docs/chunking.md)
    chunk_by: Literal["time", "key"] = "time"
    #: chunk_by: key: the integer column to cut; default: the single key column
    key_column: str | None = None
    #: auto sizing (granularity: auto, chunk_by: key): rows per chunk to aim for, from source statistics
    target_chunk_rows: int = Field(200_000, ge=1)
    #: auto sizing from the ledger's measured rows/s once chunks have run (overrides target_chunk_rows then)
    target_chunk_seconds: float | None = Field(None, gt=0)
    #: above this many chunks, chunks run in batches (several per mapped task instance, each committed alone)
    max_mapped_chunks: int = Field(DEFAULT_MAX_CHUNKS, ge=1, le=DEFAULT_MAX_CHUNKS)
    #: how many mapped task instances (batches) at most when chunks run in batches
    max_batches: int = Field(256, ge=1, le=DEFAULT_MAX_CHUNKS)
    windows: WindowsSpec = Field(default_factory=WindowsSpec)
    timezone: str = "UTC"
    #: earliest date the DAG's timetable knows (backfill commands need a start_date)
    start_date: dt.date = dt.date(2020, 1, 1)
    #: cron for scheduled/backfill runs; default follows granularity (one run per chunk period)
    schedule: str | None = None
    pool: str = "backfill_source"
    #: safety cap on one plan (chunks beyond max_mapped_chunks run in batches)
    max_chunks: int = Field(100_000, ge=1)
    #: Pattern A 'upsert' into the live table, or Pattern B 'swap' via <table>_backfill and a final merge
    mode: Literal["upsert", "swap"] = "upsert"
    #: tables without version_column: 'live_wins' (DO NOTHING) or 'backfill_wins' (overwrite if different)
    conflict_policy: Literal["live_wins", "backfill_wins"] = "live_wins"
    copy_format: Literal["binary", "text"] = "binary"
    #: casts that may round (numeric scale, float precision, fractions to integers, time precision,
    #: timestamp -> date) fail the chunk when a value would change; true, or a list of destination
    #: columns, accepts the rounding. Lengths are never cut, whatever this says.
    allow_lossy_casts: bool | list[str] = False
    statement_timeout_s: float = Field(600.0, gt=0)
    lock_timeout_s: float = Field(5.0, gt=0)
    ledger_table: str = "public.backfill_ledger"
    retries: int = Field(3, ge=0)
    retry_delay_s: float = Field(30.0, ge=0)
    throttle: ThrottleSpec = Field(default_factory=ThrottleSpec)
    watermark: WatermarkSpec = Field(default_factory=WatermarkSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    live: LiveSpec = Field(default_factory=LiveSpec)
    historical: list[HistoricalRange] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            check_timezone(v)
        except PlanError as err:
            raise ValueError(str(err)) from None
        return v

    @field_validator("source_table", "destination_table", "ledger_table")
    @classmethod
    def _table(cls, v: str) -> str:
        TableName.parse(v)
        return v

    @field_validator("source_conn_id", "destination_conn_id")
    @classmethod
    def _no_password_dsn(cls, v: str, info) -> str:
        # a conn id is serialized with the DAG: a URL with a password there leaks it (core/dsn.py)
        if dsn_has_password(v):
            raise ValueError(password_dsn_message(info.field_name))
        return v

    _dag_id = field_validator("dag_id")(classmethod(lambda cls, v: _check_dag_id(v)))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DAG_ID.match(v):
            raise ValueError(f"{v!r} may only contain letters, digits, '_', '.', '-' (it becomes part of the dag_id)")
        return v

    @field_validator("allow_lossy_casts")
    @classmethod
    def _lossy(cls, v: bool | list[str]) -> bool | list[str]:
        if isinstance(v, list):
            if not v or any(not isinstance(c, str) or not c for c in v):
                raise ValueError("must be true, false, or a non-empty list of destination column names")
            dupes = sorted({c for c in v if v.count(c) > 1})
            if dupes:
                raise ValueError(f"lists {dupes} more than once")
        return v

    @field_validator("key_columns", "columns")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            dupes = sorted({c for c in v if v.count(c) > 1})
            if dupes:
                raise ValueError(f"lists {dupes} more than once")
            if any(not isinstance(c, str) or not c for c in v):
                raise ValueError("column names must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _columns_cover_keys(self):
        if self.columns is not None:
            needed = [*self.key_columns, self.time_column, *([self.version_column] if self.version_column else [])]
            missing = [c for c in needed if c not in self.columns]
            if missing:
                raise ValueError(f"columns must include the key, time and version columns; missing {missing}")
        cursor = self.live_cursor_column
        if self.columns is not None and cursor not in self.columns:
            raise ValueError(f"live.cursor_column {cursor!r} must be one of columns {self.columns}")
        if self.chunk_by == "key" and self.key_column is None and len(self.key_columns) != 1:
            raise ValueError(
                f"chunk_by: key needs key_column (an integer column) when key_columns has several ({self.key_columns})"
            )
        bounds = [h.until for h in self.historical]
        if bounds != sorted(bounds):
            raise ValueError("historical ranges must be listed in increasing 'until' order")
        return self

    # --- derived -------------------------------------------------------------------------------
    @property
    def effective_key_column(self) -> str:
        """chunk_by: key cuts this column (checked to be an integer at plan time)."""
        return self.key_column or self.key_columns[0]

    @property
    def windows_timezone(self) -> str:
        return self.windows.timezone or self.timezone

    @property
    def effective_dag_id(self) -> str:
        return self.dag_id or f"backfill_{self.name}"

    @property
    def live_dag_id(self) -> str:
        return self.live.dag_id or f"live_{self.name}"

    @property
    def live_cursor_column(self) -> str:
        """The column live ingest reads incrementally and whose maximum becomes the watermark."""
        return self.live.cursor_column or self.version_column or self.time_column

    @property
    def source(self) -> TableName:
        return TableName.parse(self.source_table)

    @property
    def destination(self) -> TableName:
        return TableName.parse(self.destination_table)

    @property
    def staging_target(self) -> TableName:
        """Where chunks land: the live table (Pattern A) or its parallel ``<table>_backfill`` (Pattern B)."""
        dest = self.destination
        if self.mode == "swap":
            return TableName(schema_=dest.schema_, name=f"{dest.name}_backfill")
        return dest

    @property
    def effective_schedule(self) -> str:
        return (
            self.schedule
            or {
                "hour": "0 * * * *",
                "day": "0 0 * * *",
                "week": "0 0 * * 1",
                "month": "0 0 1 * *",
                "auto": "0 0 * * *",
            }[self.granularity]
        )


_NESTED: dict[str, type[BaseModel]] = {
    "throttle": ThrottleSpec,
    "watermark": WatermarkSpec,
    "live": LiveSpec,
    "validation": ValidationSpec,
    "historical": HistoricalRange,
    "windows": WindowsSpec,
}


def _format_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            model: type[BaseModel] = _NESTED.get(str(e["loc"][0]), BackfillSpec) if len(e["loc"]) > 1 else BackfillSpec
            fields = sorted(model.model_fields)
            msg = f"unknown key; valid keys are: {', '.join(fields)}"
        elif e["type"] == "missing":
            msg = "is required"
        elif e["type"] == "literal_error":
            msg = f"{e.get('input')!r} is not valid; {msg.lower()}"
        lines.append(f"  {key}: {msg}")
    return f"invalid backfill spec {where}:\n" + "\n".join(lines)


def load_spec(data: dict[str, Any] | BackfillSpec, *, where: str = "") -> BackfillSpec:
    """Validate a dict (from YAML or Python) into a spec; raise :class:`SpecError` naming every bad key."""
    if isinstance(data, BackfillSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError(f"invalid backfill spec {where}: expected a mapping of keys, got {type(data).__name__}")
    label = where or repr(data.get("name", "?"))
    try:
        return BackfillSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_error(err, label)) from None
