"""BackfillChunkOperator: load one chunk. Mapped over the plan's descriptors, one instance per chunk."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from airflow_backfill_provider.core.compat import AirflowFailException, BaseOperator
from airflow_backfill_provider.observe.lineage import LineageMixin
from airflow_backfill_provider.operators.chunkrun import ChunkRun
from airflow_backfill_provider.operators.gates import ChunkGatesMixin
from airflow_backfill_provider.core.spec import BackfillSpec

if TYPE_CHECKING:
    from airflow_backfill_provider.core.chunks import Chunk
    from airflow_backfill_provider.transfer.chunk import ChunkResult
    from airflow_backfill_provider.core.compat import Context
    from airflow_backfill_provider.throttle.probe import LoadSample

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
        key range), or a batch of chunks (``{"chunk_id", "batch"}``, plan/batches.py) run one after the other.

    Before the load probe, a chunk defers outside the spec's maintenance windows and while the source
    table is vacuumed or analyzed (operators/gates.py).
    """

    template_fields: Sequence[str] = ("chunk",)
    ui_color = "#dff0d8"

    def __init__(self, *, spec: dict[str, Any] | BackfillSpec, chunk: dict[str, str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec.model_dump(mode="json") if isinstance(spec, BackfillSpec) else dict(spec)
        self.chunk = chunk
        from airflow_backfill_provider.observe.progress_log import attach_failure_recorder

        attach_failure_recorder(self)  # a failed try records its error's first line for the page and `status`

    # --- source protection: probe -> (critical | wait deferred | pacing deferred) -> transfer --------
    #
    # Every wait is a deferral (the worker slot is released; the grid shows "deferred"). The try's state
    # (operators/chunkrun.py) travels in the trigger event's "carry", not in defer(kwargs=...): dag.test()
    # on both Airflow versions hands the resumed method the event only.

    def _lineage_tables(self):
        from airflow_backfill_provider.observe.lineage import chunk_tables
        from airflow_backfill_provider.core.spec import load_spec

        return chunk_tables(load_spec(self.spec), self.chunk)

    def execute(self, context: Context) -> dict[str, Any]:
        return self._run(context, ChunkRun())

    def execute_after_wait(self, context: Context, event: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
        """Resumed by SourceLoadTrigger: ok -> pacing/transfer; critical/timeout/error -> fail."""
        from airflow_backfill_provider.core.compat import AirflowException

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
        return self._run(context, run)

    def execute_after_pacing(self, context: Context, event: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
        """Resumed by PacingTrigger at the chunk's turn: re-probe (the load may have changed), then go."""
        return self._run(context, ChunkRun.after_pacing(event or {}))

    def _run(self, context: Context, run: ChunkRun) -> dict[str, Any]:
        """The task instance's chunks (one, or a batch's), each through the same gates, then its transfer:
        window -> load probe (+ latency signal) -> maintenance -> critical / wait (deferred) -> pacing
        (deferred) -> transfer -> ledger row. The probe and maintenance check run again once
        ``throttle.poll_interval`` has passed, not before every small chunk of a batch.

        A batch skips the chunks the ledger holds (a resumed or retried batch starts again, the ledger tells
        it where); a failure in one chunk's data fails the batch after its other chunks, named. ``run``:
        the waits of this try so far, written in the ledger row of the first chunk loaded after them."""
        import time

        from airflow_backfill_provider.plan import batches
        from airflow_backfill_provider.connections import application_name
        from airflow_backfill_provider.core.exceptions import PermanentChunkError, PlanError
        from airflow_backfill_provider.prepare.facts import PreparedRun
        from airflow_backfill_provider.core.spec import load_spec
        from airflow_backfill_provider.transfer.chunk import RunInfo, Sessions, transfer_chunk

        spec = load_spec(self.spec)
        try:
            planned = batches.expand(self.chunk, spec)
        except PlanError as err:
            raise AirflowFailException(str(err)) from err
        batch = batches.is_batch(self.chunk)
        label = str(self.chunk.get("chunk_id") or planned[0].chunk_id)
        run_id = getattr(context.get("dag_run"), "run_id", None)
        appname = application_name(self.dag_id, label)[:63]
        self._window_gate(spec)  # outside the maintenance window: defer before opening any session
        prepared = PreparedRun.of_descriptor(self.chunk)  # the plan's; checked by each chunk (prepare/facts.py)
        todo = planned
        # the try's sessions, kept across its chunks; a batch also keeps its staging table and checks
        sessions = Sessions(None, None, batch=batch)
        failed: list[tuple[Chunk, PermanentChunkError]] = []
        results: list = []
        last_check = -1e9

        def load_gate(*, now: bool = False) -> None:
            nonlocal last_check
            if now or run.probed or time.monotonic() - last_check >= spec.throttle.poll_interval:
                if not run.probed:  # the load trigger's own last probe stands in for this one
                    run.sample = self._probe(spec, run.source_conn, appname)
                    self._maintenance_gate(spec, run.source_conn, appname)  # VACUUM/ANALYZE: defer
                self._decide(spec, run, appname)
                run.probed, last_check = False, time.monotonic()

        try:
            if batch:
                run.source_conn = sessions.source = self._open_source(spec, appname)
                load_gate()  # a busy source defers the batch before it writes anything (the ledger DDL included)
                sessions.destination = self._open_destination(spec, appname, label)
                todo = self._not_in_ledger(spec, planned, sessions, prepared, run_id, label)
            for chunk in todo:
                self._window_gate(spec)  # a long batch may run into a blackout: stop between chunks
                if run.source_conn is None or run.source_conn.closed:
                    run.source_conn = self._open_source(spec, appname)
                load_gate()
                if self._pace(spec, run, appname):  # waited in the worker: decide on the load as it is now
                    load_gate(now=True)
                sessions.source = run.source_conn
                if sessions.destination is None or sessions.destination.closed:
                    sessions.destination = self._open_destination(spec, appname, chunk.chunk_id)
                waits = (run.sample, run.waited_load_s, run.waited_pacing_s)
                self._in_chunk = True  # on_kill (SIGTERM on Airflow 3) interrupts only while a chunk runs
                try:
                    # the waits go in the ledger row: the progress page shows them
                    info = RunInfo(self.dag_id, run_id, run.waited_load_s, run.waited_pacing_s)
                    result = transfer_chunk(spec, chunk, run=info, sessions=sessions, prepared=prepared)
                except PermanentChunkError as err:  # this chunk's data: go on with the others, fail at the end
                    self.log.error("Chunk %s failed (permanent): %s", chunk.chunk_id, err)
                    failed.append((chunk, err))
                else:
                    results.append((result, waits))
                    self._log_chunk(context, result, waits, batch)
                finally:
                    self._in_chunk = False
                    # the turn a resumed try waited for is used by its first chunk, whose ledger row has the waits
                    run.paced, run.waited_load_s, run.waited_pacing_s = False, 0.0, 0.0
        finally:
            run.close(sessions.destination)  # also before any deferral: no session is held across one
        self._lineage_rows = sum(r.rows_extracted for r, _ in results)  # OpenLineage output row count
        if not batch:
            if failed:
                raise AirflowFailException(str(failed[0][1])) from failed[0][1]
            return self._chunk_summary(*results[0])
        self.log.info(
            "Batch %s: %d chunk(s) loaded, %d rows, %d failed", label, len(results), self._lineage_rows, len(failed)
        )
        if failed:
            named = [f"{c.chunk_id}: {err}" for c, err in failed]
            raise AirflowFailException(
                f"batch {label}: {len(failed)} of {len(todo)} chunk(s) failed, the other {len(results)} are "
                "committed and in the ledger. Fix the cause and clear this task: only the chunks not in the ledger "
                "run again.\n" + "\n".join(named[:20]) + ("\n..." if len(named) > 20 else "")
            )
        return {"batch": label, "chunks": len(planned), "loaded": len(results), "rows": self._lineage_rows}

    def _not_in_ledger(self, spec: BackfillSpec, chunks: list[Chunk], sessions, prepared, run_id, label):
        """The batch's chunks the ledger does not hold (reprocess: that this run did not load yet), read with
        the backfill's identity its first chunk runs with (checked once on the batch's sessions)."""
        from airflow_backfill_provider.plan import chunkplan
        from airflow_backfill_provider.prepare import facts, identity
        from airflow_backfill_provider.connections import rollback_quietly
        from airflow_backfill_provider.core.exceptions import PermanentChunkError

        reprocess = bool(self.chunk["batch"].get("reprocess"))
        try:
            rd = facts.ready(spec, chunks[0], sessions.source, sessions.destination, prepared)
            sessions.checked[facts.key(spec, chunks[0])] = rd
            backfill = rd.backfill
        except PermanentChunkError:  # each chunk of that range fails on its own below, named in the batch's error
            rollback_quietly(sessions.destination)
            backfill = identity.of(spec, sessions.source, sessions.destination)
        done = chunkplan.done_coverage(
            spec, sessions.destination, backfill=backfill, run_id=run_id if reprocess else None
        )
        todo = [c for c in chunks if not chunkplan.is_done(done, c)]
        self.log.info(
            "Batch %s: %d chunk(s), %d already in the ledger, %d to load",
            label,
            len(chunks),
            len(chunks) - len(todo),
            len(todo),
        )
        return todo

    def on_kill(self) -> None:
        """SIGTERM (worker shutdown, pod eviction) while the chunk runs: stop it, roll back, let Airflow retry.

        Airflow 2.11 raises ``AirflowTaskTerminated`` itself right after on_kill. Airflow 3 only calls on_kill
        (raising AirflowTaskTerminated there would fail the task without retry), so the chunk raises its own
        interrupt from here: the destination transaction rolls back and the task is retried.
        """
        from airflow_backfill_provider.core.compat import SIGTERM_RAISES
        from airflow_backfill_provider.core.interrupts import ChunkTerminated

        if getattr(self, "_in_chunk", False) and not SIGTERM_RAISES:
            self._in_chunk = False  # once: a second signal while unwinding must not interrupt the rollback
            raise ChunkTerminated(
                f"{self.task_id}: terminated (SIGTERM) mid-chunk; its destination transaction is rolled back "
                "and the chunk will be retried"
            )

    def _decide(self, spec: BackfillSpec, run: ChunkRun, appname: str) -> None:
        """Fail over ``critical_active``; defer to SourceLoadTrigger while the source is too busy."""
        import time

        from airflow_backfill_provider.throttle.probe import critical_message, decide, wait_reason
        from airflow_backfill_provider.triggers.load import SourceLoadTrigger

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
                    application_name=f"{appname}:probe"[:63],
                    carry=run.carry_through_load_wait(),
                    baseline=(sample.window or {}).get("baseline"),
                    # no event sooner than min_defer_s: a faster resume races Airflow's scheduler (core/spec.py)
                    not_before=time.time() + throttle.min_defer_s,
                ),
                method_name="execute_after_wait",
            )

    def _pace(self, spec: BackfillSpec, run: ChunkRun, appname: str) -> float:
        """With ``min_query_interval``: reserve the pool slot's next turn and wait for it (deferred to
        PacingTrigger when it is further than ``throttle.min_defer_s``, gates.py ``_wait_or_defer``). Returns
        the seconds waited in the worker: the load decision before them is stale, and the caller makes it again
        (as a resumed deferral does)."""
        import time

        from airflow_backfill_provider.throttle.probe import reserve_destination_turn
        from airflow_backfill_provider.triggers.pacing import PacingTrigger

        if spec.throttle.min_query_interval <= 0 or run.paced:
            return 0.0
        turn = reserve_destination_turn(
            spec.destination_conn_id,
            spec.throttle,
            key=self.pool or "default_pool",
            application_name=f"{appname}:pacing"[:63],
        )
        if turn.wait_s > 0:
            self.log.info(
                "Pacing: slot %d of pool %s may query the source in %.1f s (waiting until then)",
                turn.slot,
                self.pool,
                turn.wait_s,
            )
            waited = self._wait_or_defer(
                spec,
                at=time.time() + turn.wait_s,
                trigger_for=lambda at: PacingTrigger(at=at, carry=run.carry_through_pacing()),
                method_name="execute_after_pacing",
            )
            run.waited_pacing_s += waited
            return waited
        return 0.0

    def _open_source(self, spec: BackfillSpec, appname: str) -> Any:
        """The try's source session (probe and transfers): errors as the probe's (below)."""
        from airflow_backfill_provider.connections import open_source

        conn = self._source_errors(spec, lambda: open_source(spec, appname))
        # read-only by session default; autocommit spares a BEGIN and a ROLLBACK per chunk
        conn.autocommit = True
        return conn

    def _open_destination(self, spec: BackfillSpec, appname: str, chunk_id: str) -> Any:
        """The try's destination session; a failure to connect is classified as a chunk's (core/errors.py)."""
        import psycopg2

        from airflow_backfill_provider.connections import open_destination
        from airflow_backfill_provider.core.errors import classify
        from airflow_backfill_provider.core.exceptions import PermanentChunkError

        try:
            return open_destination(spec, appname)
        except psycopg2.Error as err:
            error = classify(err, chunk_id=chunk_id)
            if isinstance(error, PermanentChunkError):
                raise AirflowFailException(str(error)) from err
            raise error from err
        except PermanentChunkError as err:  # e.g. the connection id does not exist: a retry cannot fix it
            raise AirflowFailException(str(err)) from err

    def _probe(self, spec: BackfillSpec, conn: Any, appname: str) -> LoadSample:
        """Probe the load on the chunk's own source session, with the server-wide latency signal if set."""
        from airflow_backfill_provider.throttle.probe import PROBE_TIMEOUT_S, probe_load

        def probe() -> LoadSample:
            sample = probe_load(conn, timeout_s=PROBE_TIMEOUT_S)
            if spec.throttle.max_latency_ratio is not None:  # the server-wide latency signal (throttle/loadsignal.py)
                from airflow_backfill_provider.throttle.loadsignal import add_latency

                sample = add_latency(sample, conn, spec, appname)
            return sample

        return self._source_errors(spec, probe)

    def _source_errors(self, spec: BackfillSpec, call):
        """An unreachable or overloaded source is retried; a permanent error (e.g. the connection id does not
        exist) fails at once."""
        import psycopg2

        from airflow_backfill_provider.core.compat import AirflowException
        from airflow_backfill_provider.core.exceptions import PermanentChunkError

        try:
            return call()
        except psycopg2.Error as err:
            raise AirflowException(
                f"could not probe the source's load on {spec.source_conn_id!r}: {str(err).strip()}"
            ) from err
        except PermanentChunkError as err:
            raise AirflowFailException(str(err)) from err

    def _log_chunk(self, context: Context, result: ChunkResult, waits: tuple, batch: bool) -> None:
        from airflow_backfill_provider.observe.progress_log import log_chunk_share
        from airflow_backfill_provider.throttle.probe import chunk_summary

        sample, waited_load_s, waited_pacing_s = waits
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
                sample=sample,
                waited_load_s=waited_load_s,
                waited_pacing_s=waited_pacing_s,
                rows=result.rows_extracted,
                seconds=result.seconds,
            ),
        )
        # a batch's i/n count batches, not chunks: its share line counts rows (or says how many so far)
        descriptor = {k: v for k, v in self.chunk.items() if not batch or k not in ("i", "n")}
        dag_run = context.get("dag_run")
        log_chunk_share(
            self.log, descriptor, totals=result.run_totals, run_started_at=getattr(dag_run, "start_date", None)
        )

    def _chunk_summary(self, result: ChunkResult, waits: tuple) -> dict[str, Any]:
        """A single chunk's XCom: its result, without what the plan logged already."""
        sample, waited_load_s, waited_pacing_s = waits
        out = result.to_dict()
        out.pop("decisions", None)  # logged once by the plan; keep the XCom small
        out.pop("run_totals", None)
        out.update(
            source_active=sample.active if sample is not None else None,
            waited_load_s=round(waited_load_s, 1),
            waited_pacing_s=round(waited_pacing_s, 1),
        )
        return out
