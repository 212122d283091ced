"""What the chunk operator's gates do besides the load throttle: maintenance windows and waiting out
VACUUM/ANALYZE. A mixin of :class:`BackfillChunkOperator`, which runs them before each chunk.

Every wait longer than ``throttle.min_defer_s`` is a deferral (no worker slot held); one whose end is known
and nearer than that is waited in the worker (:meth:`_wait_or_defer`). After a deferral, the task instance
starts again: a batch's ledger tells it which of its chunks are done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a mixin of BaseOperator: typed as one (log, defer, dag_id, pool, execute)
    from airflow_backfill_provider.core.compat import BaseOperator as _OperatorBase
else:
    _OperatorBase = object


class ChunkGatesMixin(_OperatorBase):
    chunk: dict[str, Any]

    # --- one rule for every deferral whose end is known (pacing turn, window opening) ---------------
    def _wait_or_defer(self, spec, *, at: float, trigger_for, method_name: str) -> float:
        """Wait until ``at`` (epoch seconds): in the worker when that is sooner than ``throttle.min_defer_s``,
        else deferred to ``trigger_for(at)``. A resume sooner than min_defer_s after deferring races Airflow's
        scheduler and fails the chunk as "killed externally" (core/spec.py, apache/airflow#67287), whichever
        trigger fires it; the load and maintenance triggers, whose end is unknown, carry the same floor as
        ``not_before``. Returns the seconds waited in the worker (0 when there was nothing to wait)."""
        import time

        wait = at - time.time()
        if wait <= 0:
            return 0.0
        if wait < spec.throttle.min_defer_s:
            self.log.info("Waiting %.1f s in the worker (shorter than throttle.min_defer_s: no deferral)", wait)
            time.sleep(wait)  # bounded by min_defer_s
            return wait
        self.defer(trigger=trigger_for(at), method_name=method_name)
        raise AssertionError("unreachable: defer() raises TaskDeferred")

    # --- maintenance windows ------------------------------------------------------------------------
    def _window_gate(self, spec) -> None:
        """Defer until the window opens when a chunk may not start now (throttle/windows.py)."""
        import pendulum

        from airflow_backfill_provider.triggers.pacing import PacingTrigger
        from airflow_backfill_provider.throttle.windows import parse_windows

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
        self._wait_or_defer(spec, at=opens.timestamp(), trigger_for=lambda at: PacingTrigger(at=at),
                            method_name="execute_after_window")  # fmt: skip

    def execute_after_window(self, context, event: dict[str, Any] | None = None, **_: Any):
        """The window opened: start again (re-checks the window, then maintenance, load, pacing)."""
        return self.execute(context)

    # --- VACUUM / ANALYZE on the source table ---------------------------------------------------------
    def _maintenance_gate(self, spec, src_conn, appname: str, src_table=None) -> None:
        import time

        from airflow_backfill_provider.throttle.maintenance import running
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
                not_before=time.time() + spec.throttle.min_defer_s,  # no resume racing the scheduler
            ),
            method_name="execute_after_maintenance",
        )

    def execute_after_maintenance(self, context, event: dict[str, Any] | None = None, **_: Any):
        from airflow_backfill_provider.core.compat import AirflowException, AirflowFailException

        event = event or {}
        if event.get("status") == "timeout":
            raise AirflowException(event.get("message"))  # retried: maintenance may be over later
        if event.get("status") != "ok":
            raise AirflowFailException(event.get("message") or f"maintenance trigger ended with {event!r}")
        self.log.info("Source maintenance over after %.1f s", float(event.get("waited_s") or 0.0))
        return self.execute(context)
