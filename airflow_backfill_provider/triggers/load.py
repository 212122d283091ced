"""SourceLoadTrigger: wait in the triggerer, not in a worker, until the source's load drops.

The chunk operator defers to this trigger when its probe said "wait". The trigger probes first at
``not_before`` (``throttle.min_defer_s`` after the deferral: a sooner resume races Airflow's scheduler, see
``ThrottleSpec.min_defer_s``), then re-probes with exponential backoff (``poll_interval`` doubling up to
``poll_max``) and fires once, never before ``not_before``:

- ``{"status": "ok", "sample": ..., "waited_s": ...}`` when the load is back under the thresholds;
- ``{"status": "critical", "sample": ..., "waited_s": ..., "message": ...}`` when it went over
  ``critical_active`` meanwhile (the task then fails without retry);
- ``{"status": "timeout", "sample": ..., "waited_s": ..., "message": ...}`` after ``max_wait``
  seconds, the message giving the last figures seen.

Async on both Airflow 3.3 and 2.11 triggerers: the connection is resolved with the async lookup
(``compat.aget_connection``), and each blocking psycopg2 probe runs in ``asyncio.to_thread`` on a
short-lived session (``connect_timeout``, ``statement_timeout`` and the client-side deadline bound
it), so the event loop is never blocked and no source session is held between probes. The trigger
also waits for each probe with ``asyncio.wait_for``: even a probe stuck on a stalled network cannot
delay the ``timeout`` event past ``max_wait`` + :data:`EVENT_MARGIN_S`. ``serialize()`` carries only
the connection id, the throttle thresholds and the start time: never credentials.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from airflow_backfill_provider.core.compat import BaseTrigger, TriggerEvent
from airflow_backfill_provider.core.dsn import dsn_has_password, password_dsn_message

#: the timeout event fires at most this long after max_wait, even if a probe hangs
EVENT_MARGIN_S = 1.0


class SourceLoadTrigger(BaseTrigger):
    """Fire when the source database's load is under the chunk's throttle thresholds.

    :param conn_id: Airflow connection id of the source (a libpq URL without a password works too,
        for tests and scripts; a URL with a password is refused so it never lands in the metadata DB).
    :param throttle: the spec's ``throttle`` section as a JSON dict (``ThrottleSpec.model_dump(mode="json")``).
    :param started_at: epoch seconds when the chunk started waiting; ``max_wait`` counts from there,
        across triggerer restarts and repeated deferrals.
    :param application_name: the probe session's name (``backfill:<dag_id>:<chunk_id>:probe``).
    :param exclude_application_prefix: sessions whose application_name starts with it are not counted.
    :param carry: a small JSON dict echoed in the event, so the resumed task gets back what it knew.
    :param baseline: the source's quiet latency baseline the chunk read (``loadsignal.Baseline`` as a
        dict), for ``throttle.max_latency_ratio``; the trigger compares with it and never writes it.
    :param not_before: epoch seconds before which no event fires (the chunk's deferral + ``throttle.min_defer_s``):
        the first probe is timed to end then, and an earlier answer is held until then.
    """

    def __init__(
        self,
        *,
        conn_id: str,
        throttle: dict[str, Any],
        started_at: float | None = None,
        application_name: str = "backfill:probe",
        exclude_application_prefix: str | None = "backfill:",
        carry: dict[str, Any] | None = None,
        baseline: dict[str, Any] | None = None,
        not_before: float | None = None,
    ) -> None:
        super().__init__()
        if dsn_has_password(conn_id):
            raise ValueError(password_dsn_message("SourceLoadTrigger conn_id"))
        self.conn_id = conn_id
        self.throttle = dict(throttle)
        self.started_at = float(started_at if started_at is not None else time.time())
        self.application_name = application_name
        self.exclude_application_prefix = exclude_application_prefix
        self.carry = dict(carry or {})
        self.baseline = dict(baseline) if baseline else None
        self.not_before = None if not_before is None else float(not_before)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{self.__class__.__module__}.{self.__class__.__qualname__}",
            {
                "conn_id": self.conn_id,
                "throttle": self.throttle,
                "started_at": self.started_at,
                "application_name": self.application_name,
                "exclude_application_prefix": self.exclude_application_prefix,
                "carry": self.carry,
                "baseline": self.baseline,
                "not_before": self.not_before,
            },
        )

    def _probe_once(self, kwargs: dict[str, Any]):
        from airflow_backfill_provider.connections import open_connection
        from airflow_backfill_provider.core.spec import ThrottleSpec
        from airflow_backfill_provider.throttle.probe import PROBE_TIMEOUT_S, probe_load

        kwargs = {"connect_timeout": PROBE_TIMEOUT_S, **kwargs}
        conn = open_connection(
            kwargs, application_name=self.application_name, readonly=True, statement_timeout_s=PROBE_TIMEOUT_S
        )
        try:
            conn.autocommit = True
            sample = probe_load(conn, exclude_application_prefix=self.exclude_application_prefix)
            throttle = ThrottleSpec.model_validate(self.throttle)
            if throttle.max_latency_ratio is not None:  # server-wide latency over a window (throttle/loadsignal.py)
                import dataclasses

                from airflow_backfill_provider.throttle.loadsignal import Baseline, measure

                sample = dataclasses.replace(
                    sample,
                    **measure(
                        conn,
                        throttle,
                        baseline=Baseline.from_dict(self.baseline),
                        exclude_application_prefix=self.exclude_application_prefix or "backfill:",
                    ),
                )
            return sample
        finally:
            conn.close()

    def _event(self, status: str, sample, **extra) -> TriggerEvent:
        payload = {
            "status": status,
            "sample": sample.to_dict() if sample is not None else None,
            "waited_s": round(time.time() - self.started_at, 3),
            "carry": self.carry,
            **extra,
        }
        return TriggerEvent(payload)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import psycopg2

        from airflow_backfill_provider.connections import aconnection_kwargs
        from airflow_backfill_provider.core.exceptions import PermanentChunkError
        from airflow_backfill_provider.core.spec import ThrottleSpec
        from airflow_backfill_provider.throttle.probe import critical_message, decide, timeout_message, wait_reason
        from airflow_backfill_provider.triggers import hold_until

        throttle = ThrottleSpec.model_validate(self.throttle)
        # the chunk has just seen the source busy: the first probe ends at not_before, not at once (a resume
        # sooner than min_defer_s after the deferral races Airflow's scheduler: core/spec.py, ThrottleSpec.min_defer_s)
        window = throttle.load_window_s if throttle.max_latency_ratio is not None else 0.0
        await hold_until(
            self.not_before, lead_s=window, cap_s=max(0.0, throttle.max_wait - (time.time() - self.started_at))
        )
        try:
            kwargs = await aconnection_kwargs(self.conn_id)
        except PermanentChunkError as err:
            await hold_until(self.not_before)
            yield self._event("error", None, message=str(err))
            return
        interval = throttle.poll_interval
        sample = None
        last_error: str | None = None
        while True:
            # the probe's own bounds (connect_timeout, statement_timeout + client deadline) end its
            # thread eventually; this one ends the wait for it in time for max_wait
            budget = max(throttle.max_wait - (time.time() - self.started_at), 0.0) + EVENT_MARGIN_S
            try:
                fresh = await asyncio.wait_for(asyncio.to_thread(self._probe_once, kwargs), timeout=budget)
                sample, last_error = fresh, None
            except TimeoutError:
                last_error = f"the probe got no answer within {budget:.1f} s (network stall?)"
                self.log.warning("Load probe on %s: %s", self.conn_id, last_error)
            except psycopg2.Error as err:  # a busy or restarting source: keep waiting, report at timeout
                last_error = str(err).strip() or type(err).__name__
                self.log.warning("Load probe on %s failed (will retry): %s", self.conn_id, last_error)
            else:
                decision = decide(fresh, throttle)
                if decision == "go":
                    self.log.info("Source load dropped: %s", fresh.describe())
                    await hold_until(self.not_before)
                    yield self._event("ok", fresh)
                    return
                if decision == "critical":
                    await hold_until(self.not_before)
                    yield self._event("critical", fresh, message=critical_message(fresh, throttle))
                    return
            waited = time.time() - self.started_at
            if waited >= throttle.max_wait:
                await hold_until(self.not_before)
                yield self._event("timeout", sample, message=timeout_message(sample, throttle, waited, last_error))
                return
            delay = min(interval, throttle.max_wait - waited)
            self.log.info(
                "Source busy (%s); re-probing in %.1f s (waited %.0f s of %g s)",
                wait_reason(sample, throttle) if sample else last_error,
                delay,
                waited,
                throttle.max_wait,
            )
            await asyncio.sleep(delay)
            interval = min(interval * 2, throttle.poll_max)
