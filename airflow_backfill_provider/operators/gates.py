"""What the chunk operator does besides the load throttle: maintenance windows, waiting out VACUUM/ANALYZE,
and running a batch of chunks (batches.py). A mixin of :class:`BackfillChunkOperator`.

Every wait is a deferral (no worker slot held). A resumed batch simply starts again: the ledger tells
it which of its chunks are done, so it carries no state through the trigger.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a mixin of BaseOperator: typed as one (log, defer, dag_id, pool, execute)
    from airflow_backfill_provider.compat import BaseOperator as _OperatorBase
else:
    _OperatorBase = object


class ChunkGatesMixin(_OperatorBase):
    chunk: dict[str, Any]

    # --- maintenance windows ------------------------------------------------------------------------
    def _window_gate(self, spec) -> None:
        """Defer until the window opens when a chunk may not start now (windows.py)."""
        import pendulum

        from airflow_backfill_provider.triggers.pacing import PacingTrigger
        from airflow_backfill_provider.windows import parse_windows

        w = spec.windows
        if not (w.allowed or w.blackout):
            return
        opens = parse_windows(w.allowed, w.blackout, spec.windows_timezone).next_open(pendulum.now("UTC"))
        if opens is None:
            return
        self.log.info(
            "Outside the maintenance window (allowed %s, blackout %s, %s): deferred until %s",
            w.allowed or "any time",
            w.blackout or "none",
            spec.windows_timezone,
            opens.isoformat(),
        )
        self.defer(trigger=PacingTrigger(at=opens.timestamp()), method_name="execute_after_window")

    def execute_after_window(self, context, event: dict[str, Any] | None = None, **_: Any):
        """The window opened: start again (re-checks the window, then maintenance, load, pacing)."""
        return self.execute(context)

    # --- VACUUM / ANALYZE on the source table ---------------------------------------------------------
    def _maintenance_gate(self, spec, src_conn, appname: str, src_table=None) -> None:
        from airflow_backfill_provider.maintenance import running
        from airflow_backfill_provider.triggers.maintenance import MaintenanceTrigger

        if not spec.windows.wait_for_maintenance:
            return
        table = src_table or spec.source
        busy = running(src_conn, table)
        if not busy:
            return
        self.log.info("Source table %s is under maintenance (%s): waiting, deferred", table, ", ".join(busy))
        self.defer(
            trigger=MaintenanceTrigger(
                conn_id=spec.source_conn_id,
                table=str(table),
                throttle=spec.throttle.model_dump(mode="json"),
                application_name=f"{appname}:maintenance",
            ),
            method_name="execute_after_maintenance",
        )

    def execute_after_maintenance(self, context, event: dict[str, Any] | None = None, **_: Any):
        from airflow_backfill_provider.compat import AirflowException, AirflowFailException

        event = event or {}
        if event.get("status") == "timeout":
            raise AirflowException(event.get("message"))  # retried: maintenance may be over later
        if event.get("status") != "ok":
            raise AirflowFailException(event.get("message") or f"maintenance trigger ended with {event!r}")
        self.log.info("Source maintenance over after %.1f s", float(event.get("waited_s") or 0.0))
        return self.execute(context)

    # --- batches ------------------------------------------------------------------------------------
    def _run_batch(self, context, spec, *, paced: bool = False, waited: tuple[float, float] = (0.0, 0.0)) -> dict:
        """Run a batch's chunks in order, each committed alone; skip the ones the ledger holds.

        ``waited``: (load, pacing) seconds the batch was deferred before this resumption; the ledger row of
        the first chunk it then loads carries them (the progress page shows them), the others 0."""
        from airflow_backfill_provider import batches, chunkplan, identity
        from airflow_backfill_provider.compat import AirflowFailException
        from airflow_backfill_provider.connections import application_name, close_all, open_destination, open_source
        from airflow_backfill_provider.exceptions import PermanentChunkError, PlanError
        from airflow_backfill_provider.throttle import (
            PROBE_TIMEOUT_S,
            critical_message,
            decide,
            probe_load,
            reserve_destination_turn,
            wait_reason,
        )
        from airflow_backfill_provider.transfer import transfer_chunk
        from airflow_backfill_provider.triggers.load import SourceLoadTrigger
        from airflow_backfill_provider.triggers.pacing import PacingTrigger

        try:
            chunks = batches.expand(self.chunk, spec)
        except PlanError as err:
            raise AirflowFailException(str(err)) from err
        label = self.chunk.get("chunk_id", "batch")
        run_id = getattr(context.get("dag_run"), "run_id", None)
        reprocess = bool(self.chunk["batch"].get("reprocess"))
        appname = application_name(self.dag_id, label)[:63]
        self._window_gate(spec)
        dst = open_destination(spec, appname)
        src = None
        try:
            src = open_source(spec, appname)
            # read-only by session default; autocommit spares a BEGIN and a ROLLBACK per chunk
            src.autocommit = True
            # reprocess: a resumed or retried batch skips only what this run loaded already
            done = chunkplan.done_coverage(
                spec, dst, backfill=identity.of(spec, src, dst), run_id=run_id if reprocess else None
            )
            todo = [c for c in chunks if not chunkplan.is_done(done, c)]
            self.log.info(
                "Batch %s: %d chunk(s), %d already in the ledger, %d to load",
                label,
                len(chunks),
                len(chunks) - len(todo),
                len(todo),
            )
            prepared: dict = {}
            failed: list[str] = []
            loaded = rows = 0
            last_check = -1e9
            for chunk in todo:
                self._window_gate(spec)  # a long batch may run into a blackout: stop between chunks
                if src is None or src.closed:
                    src = open_source(spec, appname)
                    # read-only by session default; autocommit spares a BEGIN and a ROLLBACK per chunk
                    src.autocommit = True
                if dst.closed:
                    dst = open_destination(spec, appname)
                if time.monotonic() - last_check >= spec.throttle.poll_interval:
                    # probe the load (and maintenance) at most once per poll_interval, not per small chunk
                    sample = probe_load(src, timeout_s=PROBE_TIMEOUT_S)
                    decision = decide(sample, spec.throttle)
                    if decision == "critical":
                        raise AirflowFailException(critical_message(sample, spec.throttle))
                    if decision == "wait":
                        self.log.info("Batch %s waits (deferred) because %s", label, wait_reason(sample, spec.throttle))
                        close_all(src, dst)
                        self.defer(
                            trigger=SourceLoadTrigger(
                                conn_id=spec.source_conn_id,
                                throttle=spec.throttle.model_dump(mode="json"),
                                application_name=f"{appname}:probe"[:63],
                            ),
                            method_name="execute_after_wait",
                        )
                    try:
                        self._maintenance_gate(spec, src, appname)
                    except BaseException:
                        close_all(src, dst)
                        raise
                    last_check = time.monotonic()
                if spec.throttle.min_query_interval > 0 and not paced:
                    turn = reserve_destination_turn(
                        spec.destination_conn_id,
                        spec.throttle,
                        key=self.pool or "default_pool",
                        application_name=f"{appname}:pacing"[:63],
                    )
                    if turn.wait_s > 0:
                        close_all(src, dst)
                        self.defer(
                            trigger=PacingTrigger(at=time.time() + turn.wait_s), method_name="execute_after_pacing"
                        )
                try:
                    result = transfer_chunk(
                        spec,
                        chunk,
                        dag_id=self.dag_id,
                        run_id=run_id,
                        source_conn=src,
                        destination_conn=dst,
                        prepared=prepared,
                        close=False,
                        waited_load_s=waited[0],
                        waited_pacing_s=waited[1],
                    )
                except PermanentChunkError as err:  # this chunk's data: go on with the others, fail at the end
                    self.log.error("Chunk %s failed (permanent): %s", chunk.chunk_id, err)
                    failed.append(f"{chunk.chunk_id}: {err}")
                    continue
                finally:
                    paced = False  # the turn a resumed batch waited for is used by its first chunk
                    waited = (0.0, 0.0)  # and that chunk's ledger row carries the wait
                loaded += 1
                rows += result.rows_extracted
                self.log.info(
                    "chunk %s: %d rows extracted, %d inserted, %d updated in %.3fs",
                    result.chunk_id,
                    result.rows_extracted,
                    result.inserted,
                    result.updated,
                    result.seconds,
                )
        finally:
            close_all(src, dst)
        self.log.info("Batch %s: %d chunk(s) loaded, %d rows, %d failed", label, loaded, rows, len(failed))
        if failed:
            raise AirflowFailException(
                f"batch {label}: {len(failed)} of {len(todo)} chunk(s) failed, the other {loaded} are committed and "
                f"in the ledger. Fix the cause and clear this task: only the chunks not in the ledger run again.\n"
                + "\n".join(failed[:20])
                + ("\n..." if len(failed) > 20 else "")
            )
        return {"batch": label, "chunks": len(chunks), "loaded": loaded, "rows": rows}
