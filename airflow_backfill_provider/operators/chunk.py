"""BackfillChunkOperator: load one chunk. Mapped over the plan's descriptors, one instance per chunk."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from airflow_backfill_provider.compat import AirflowFailException, BaseOperator
from airflow_backfill_provider.connections import close_all
from airflow_backfill_provider.lineage import LineageMixin
from airflow_backfill_provider.operators.chunkrun import ChunkRun
from airflow_backfill_provider.operators.gates import ChunkGatesMixin
from airflow_backfill_provider.spec import BackfillSpec

if TYPE_CHECKING:
    from airflow_backfill_provider.chunks import Chunk
    from airflow_backfill_provider.compat import Context
    from airflow_backfill_provider.throttle import LoadSample

#: label each mapped task instance by its chunk in the grid (instead of 0, 1, 2 ...)
MAP_INDEX_TEMPLATE = "{{ task.chunk['chunk_id'] }}"


class BackfillChunkOperator(LineageMixin, ChunkGatesMixin, BaseOperator):
    """Stream one chunk from source to destination and upsert it newer-wins, in one transaction.

    Transient failures (connection lost, serialization failure, deadlock, timeouts) raise and are
    retried by Airflow with exponential backoff; permanent ones (missing table or column, no unique
    key, bad cast) fail at once without retries, with a message that says what to fix.

    Map it with ``.partial(pool=...)`` (a classic operator honours it; ``@task`` would not).

    Source protection (docs/source-protection.md): before reading, the chunk probes the source's
    load; over ``throttle.critical_active`` it fails without retry, over ``max_active`` (or
    ``max_replica_lag``) it defers to :class:`SourceLoadTrigger`, and with
    ``throttle.min_query_interval`` it defers to :class:`PacingTrigger` until its turn. It never
    waits inside a worker.

    :param spec: the backfill spec (dict or :class:`BackfillSpec`).
    :param chunk: a descriptor from the plan task: ``{"chunk_id", "start", "end"}`` (plus ``key`` for a
        key range), or a batch of chunks (``{"chunk_id", "batch"}``, batches.py) run one after the other.

    Before the load probe, a chunk defers outside the spec's maintenance windows and while the source
    table is vacuumed or analyzed (operators/gates.py).
    """

    template_fields: Sequence[str] = ("chunk",)
    ui_color = "#dff0d8"

    def __init__(self, *, spec: dict[str, Any] | BackfillSpec, chunk: dict[str, str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec.model_dump(mode="json") if isinstance(spec, BackfillSpec) else dict(spec)
        self.chunk = chunk
        from airflow_backfill_provider.progress_log import attach_failure_recorder

        attach_failure_recorder(self)  # a failed try records its error's first line for the page and `status`

    # --- source protection: probe -> (critical | wait deferred | pacing deferred) -> transfer --------
    #
    # Every wait is a deferral (the worker slot is released; the grid shows "deferred"). The try's state
    # (operators/chunkrun.py) travels in the trigger event's "carry", not in defer(kwargs=...): dag.test()
    # on both Airflow versions hands the resumed method the event only.

    def _lineage_tables(self):
        from airflow_backfill_provider.lineage import chunk_tables
        from airflow_backfill_provider.spec import load_spec

        return chunk_tables(load_spec(self.spec), self.chunk)

    def execute(self, context: Context) -> dict[str, Any]:
        return self._gate(context, ChunkRun())

    def execute_after_wait(self, context: Context, event: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
        """Resumed by SourceLoadTrigger: ok -> pacing/transfer; critical/timeout/error -> fail."""
        from airflow_backfill_provider.compat import AirflowException

        event = event or {}
        status = event.get("status")
        if status == "critical":
            raise AirflowFailException(event["message"])
        if status == "timeout":
            raise AirflowException(event["message"])  # retried: the source may be quieter later
        if status != "ok":
            raise AirflowFailException(
                event.get("message") or f"source load trigger ended with unexpected event {event!r}"
            )
        run = ChunkRun.after_load_wait(event)
        assert run.sample is not None  # the trigger's last probe, always in an ok event
        self.log.info("Source load dropped after %.1f s: %s", run.waited_load_s, run.sample.describe())
        return self._gate(context, run)

    def execute_after_pacing(self, context: Context, event: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
        """Resumed by PacingTrigger at the chunk's turn: re-probe (the load may have changed), then go."""
        return self._gate(context, ChunkRun.after_pacing(event or {}))

    def _gate(self, context: Context, run: ChunkRun) -> dict[str, Any]:
        from airflow_backfill_provider.batches import is_batch
        from airflow_backfill_provider.chunks import Chunk
        from airflow_backfill_provider.connections import application_name
        from airflow_backfill_provider.exceptions import PlanError
        from airflow_backfill_provider.spec import load_spec

        spec = load_spec(self.spec)
        if is_batch(self.chunk):
            return self._run_batch(context, spec, paced=run.paced, waited=(run.waited_load_s, run.waited_pacing_s))
        try:
            chunk = Chunk.from_descriptor(self.chunk, spec.timezone)
        except PlanError as err:
            raise AirflowFailException(str(err)) from err
        appname = application_name(self.dag_id, chunk.chunk_id)
        self._window_gate(spec)  # outside the maintenance window: defer before opening any session

        self._in_chunk = True  # on_kill (SIGTERM on Airflow 3) interrupts only while the chunk runs
        try:
            if not run.probed:
                # the probe runs on the session the transfer will use: one source connection per chunk
                run.source_conn, run.sample = self._probe(spec, appname)
                self._maintenance_gate(spec, run.source_conn, appname)  # VACUUM/ANALYZE on the table: defer
            return self._decide_and_go(context, spec, chunk, appname, run)
        finally:
            self._in_chunk = False
            run.close()  # no-op once the transfer took the session; closed before any deferral

    def on_kill(self) -> None:
        """SIGTERM (worker shutdown, pod eviction) while the chunk runs: stop it, roll back, let Airflow retry.

        Airflow 2.11 raises ``AirflowTaskTerminated`` itself right after on_kill. Airflow 3 only calls on_kill
        (raising AirflowTaskTerminated there would fail the task without retry), so the chunk raises its own
        interrupt from here: the destination transaction rolls back and the task is retried.
        """
        from airflow_backfill_provider.compat import SIGTERM_RAISES
        from airflow_backfill_provider.interrupts import ChunkTerminated

        if getattr(self, "_in_chunk", False) and not SIGTERM_RAISES:
            self._in_chunk = False  # once: a second signal while unwinding must not interrupt the rollback
            raise ChunkTerminated(
                f"{self.task_id}: terminated (SIGTERM) mid-chunk; its destination transaction is rolled back "
                "and the chunk will be retried"
            )

    def _decide_and_go(
        self, context: Context, spec: BackfillSpec, chunk: Chunk, appname: str, run: ChunkRun
    ) -> dict[str, Any]:
        import time

        from airflow_backfill_provider.throttle import (
            critical_message,
            decide,
            reserve_destination_turn,
            wait_reason,
        )
        from airflow_backfill_provider.triggers.load import SourceLoadTrigger
        from airflow_backfill_provider.triggers.pacing import PacingTrigger

        throttle = spec.throttle
        sample = run.sample
        assert sample is not None  # probed here or by the load trigger
        if sample.hidden:
            self.log.warning(
                "%d source session(s) are hidden from the probe: grant pg_monitor to the source user so "
                "the load threshold sees them",
                sample.hidden,
            )
        decision = decide(sample, throttle)
        self.log.info("Source load: %s -> %s", sample.describe(), decision)
        if decision == "critical":
            raise AirflowFailException(critical_message(sample, throttle))
        if decision == "wait":
            self.log.info("Waiting (deferred, no worker slot) because %s", wait_reason(sample, throttle))
            self.defer(
                trigger=SourceLoadTrigger(
                    conn_id=spec.source_conn_id,
                    throttle=throttle.model_dump(mode="json"),
                    started_at=time.time() - run.waited_load_s,  # max_wait counts all load waits of this try
                    application_name=f"{appname}:probe",
                    carry=run.carry_through_load_wait(),
                    baseline=(sample.window or {}).get("baseline"),
                ),
                method_name="execute_after_wait",
            )
        if throttle.min_query_interval > 0 and not run.paced:
            turn = reserve_destination_turn(
                spec.destination_conn_id,
                throttle,
                key=self.pool or "default_pool",
                application_name=f"{appname}:pacing",
            )
            if turn.wait_s > 0:
                self.log.info(
                    "Pacing: slot %d of pool %s may query the source in %.1f s (deferred until then)",
                    turn.slot,
                    self.pool,
                    turn.wait_s,
                )
                self.defer(
                    trigger=PacingTrigger(
                        at=time.time() + turn.wait_s,
                        carry=run.carry_through_pacing(),
                    ),
                    method_name="execute_after_pacing",
                )
        return self._transfer(context, spec, chunk, run)

    def _probe(self, spec: BackfillSpec, appname: str) -> tuple[Any, LoadSample]:
        """Open the chunk's source session and probe the load on it: (connection, sample)."""
        import psycopg2

        from airflow_backfill_provider.compat import AirflowException
        from airflow_backfill_provider.exceptions import PermanentChunkError
        from airflow_backfill_provider.throttle import PROBE_TIMEOUT_S, probe_load
        from airflow_backfill_provider.connections import open_source

        conn = None
        try:
            conn = open_source(spec, appname)
            sample = probe_load(conn, timeout_s=PROBE_TIMEOUT_S)
            if spec.throttle.max_latency_ratio is not None:  # the server-wide latency signal (loadsignal.py)
                from airflow_backfill_provider.loadsignal import add_latency

                sample = add_latency(sample, conn, spec, appname)
            return conn, sample
        except psycopg2.Error as err:  # unreachable or overloaded source: a retry may succeed
            close_all(conn)
            raise AirflowException(
                f"could not probe the source's load on {spec.source_conn_id!r}: {str(err).strip()}"
            ) from err
        except PermanentChunkError as err:  # e.g. the connection id does not exist: a retry cannot fix it
            close_all(conn)
            raise AirflowFailException(str(err)) from err

    def _transfer(self, context: Context, spec: BackfillSpec, chunk: Chunk, run: ChunkRun) -> dict[str, Any]:
        from airflow_backfill_provider.exceptions import PermanentChunkError
        from airflow_backfill_provider.identity import carried
        from airflow_backfill_provider.throttle import chunk_summary
        from airflow_backfill_provider.transfer import transfer_chunk

        run_id = getattr(context.get("dag_run"), "run_id", None)
        try:
            result = transfer_chunk(
                spec,
                chunk,
                dag_id=self.dag_id,
                run_id=run_id,
                source_conn=run.take_source(),
                waited_load_s=run.waited_load_s,  # kept in the ledger row: the progress page shows the waits
                waited_pacing_s=run.waited_pacing_s,
                backfill=carried(spec, self.chunk),
            )
        except PermanentChunkError as err:
            raise AirflowFailException(str(err)) from err
        self.log.info(
            "Chunk %s [%s, %s): %d rows extracted, %d inserted, %d updated, %d unchanged in %.2fs (%.0f rows/s)",
            result.chunk_id,
            result.start,
            result.end,
            result.rows_extracted,
            result.inserted,
            result.updated,
            result.unchanged,
            result.seconds,
            result.rows_per_s,
        )
        self.log.info(
            "%s",
            chunk_summary(
                chunk_id=result.chunk_id,
                sample=run.sample,
                waited_load_s=run.waited_load_s,
                waited_pacing_s=run.waited_pacing_s,
                rows=result.rows_extracted,
                seconds=result.seconds,
            ),
        )
        from airflow_backfill_provider.progress_log import log_chunk_share

        self._lineage_rows = result.rows_extracted  # OpenLineage output row count
        dag_run = context.get("dag_run")
        log_chunk_share(
            self.log, self.chunk, totals=result.run_totals, run_started_at=getattr(dag_run, "start_date", None)
        )
        out = result.to_dict()
        out.pop("decisions", None)  # logged once by the plan; keep the XCom small
        out.pop("run_totals", None)
        out.update(
            source_active=run.sample.active if run.sample is not None else None,
            waited_load_s=round(run.waited_load_s, 1),
            waited_pacing_s=round(run.waited_pacing_s, 1),
        )
        return out
