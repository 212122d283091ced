"""MaintenanceTrigger: wait in the triggerer until no VACUUM/ANALYZE runs on the source table.

Polls ``maintenance.running`` on a short-lived source session (in a thread: psycopg2 blocks) from
``not_before`` on (the deferral + ``throttle.min_defer_s``), with the load throttle's backoff (``poll_interval``
doubling up to ``poll_max``) and bound (``max_wait``).
Fires once: ``{"status": "ok"}``, ``{"status": "timeout", "message"}`` or ``{"status": "error", "message"}``.
Serializes only the connection id, the table name and the throttle numbers, never credentials.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from airflow_backfill_provider.core.compat import BaseTrigger, TriggerEvent
from airflow_backfill_provider.core.dsn import dsn_has_password, password_dsn_message


class MaintenanceTrigger(BaseTrigger):
    def __init__(
        self,
        *,
        conn_id: str,
        table: str,
        throttle: dict[str, Any],
        started_at: float | None = None,
        application_name: str = "backfill:maintenance",
        not_before: float | None = None,
    ) -> None:
        super().__init__()
        if dsn_has_password(conn_id):
            raise ValueError(password_dsn_message("MaintenanceTrigger conn_id"))
        self.conn_id = conn_id
        self.table = table
        self.throttle = dict(throttle)
        self.started_at = float(started_at if started_at is not None else time.time())
        self.application_name = application_name
        #: no event before this (epoch seconds): the deferral + throttle.min_defer_s (ThrottleSpec says why)
        self.not_before = None if not_before is None else float(not_before)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{self.__class__.__module__}.{self.__class__.__qualname__}",
            {
                "conn_id": self.conn_id,
                "table": self.table,
                "throttle": self.throttle,
                "started_at": self.started_at,
                "application_name": self.application_name,
                "not_before": self.not_before,
            },
        )

    def _check_once(self, kwargs: dict[str, Any]) -> list[str]:
        from airflow_backfill_provider.connections import open_connection
        from airflow_backfill_provider.throttle.maintenance import running
        from airflow_backfill_provider.core.spec import TableName
        from airflow_backfill_provider.throttle.probe import PROBE_TIMEOUT_S

        conn = open_connection(
            {"connect_timeout": PROBE_TIMEOUT_S, **kwargs},
            application_name=self.application_name,
            readonly=True,
            statement_timeout_s=PROBE_TIMEOUT_S,
        )
        try:
            conn.autocommit = True
            return running(conn, TableName.parse(self.table))
        finally:
            conn.close()

    def _event(self, status: str, **extra) -> TriggerEvent:
        return TriggerEvent({"status": status, "waited_s": round(time.time() - self.started_at, 3), **extra})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import psycopg2

        from airflow_backfill_provider.connections import aconnection_kwargs
        from airflow_backfill_provider.core.exceptions import PermanentChunkError
        from airflow_backfill_provider.core.spec import ThrottleSpec
        from airflow_backfill_provider.triggers import hold_until

        throttle = ThrottleSpec.model_validate(self.throttle)
        # maintenance was running a moment ago: the first check comes at not_before
        await hold_until(self.not_before, cap_s=max(0.0, throttle.max_wait - (time.time() - self.started_at)))
        try:
            kwargs = await aconnection_kwargs(self.conn_id)
        except PermanentChunkError as err:
            yield self._event("error", message=str(err))
            return
        interval = throttle.poll_interval
        seen: list[str] | str = []
        while True:
            try:
                seen = await asyncio.to_thread(self._check_once, kwargs)
            except psycopg2.Error as err:  # keep waiting; say so at the timeout
                seen = f"check failed: {str(err).strip()}"
            else:
                if not seen:
                    yield self._event("ok")
                    return
            waited = time.time() - self.started_at
            if waited >= throttle.max_wait:
                yield self._event(
                    "timeout",
                    message=(
                        f"maintenance on the source table {self.table} still running after {waited:.0f} s >= "
                        f"throttle.max_wait={throttle.max_wait:g} s ({seen}); the chunk gives up (Airflow may retry "
                        "it later); set windows.wait_for_maintenance: false to read during maintenance"
                    ),
                )
                return
            delay = min(interval, throttle.max_wait - waited)
            self.log.info("Source table %s under maintenance (%s); re-checking in %.1f s", self.table, seen, delay)
            await asyncio.sleep(delay)
            interval = min(interval * 2, throttle.poll_max)
