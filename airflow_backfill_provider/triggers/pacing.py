"""PacingTrigger: wait in the triggerer until a chunk's reserved pacing turn (see ``throttle/probe.py``).

Like a DateTimeTrigger, but it echoes a small ``carry`` dict in its event, so the resumed task gets
back what it knew before deferring (the load it saw, how long it already waited) from the event
itself: ``dag.test()`` on both Airflow versions passes only the event to the resumed method.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from airflow_backfill_provider.core.compat import BaseTrigger, TriggerEvent


class PacingTrigger(BaseTrigger):
    """Fire at ``at`` (epoch seconds) with ``{"status": "turn", "waited_s": ..., "carry": carry}``."""

    def __init__(self, *, at: float, carry: dict[str, Any] | None = None, deferred_at: float | None = None) -> None:
        super().__init__()
        self.at = float(at)
        self.carry = dict(carry or {})
        self.deferred_at = float(deferred_at if deferred_at is not None else time.time())

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{self.__class__.__module__}.{self.__class__.__qualname__}",
            {"at": self.at, "carry": self.carry, "deferred_at": self.deferred_at},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        delay = self.at - time.time()
        if delay > 0:
            self.log.info("Pacing: the chunk's turn to query the source is in %.1f s", delay)
            await asyncio.sleep(delay)
        yield TriggerEvent(
            {"status": "turn", "waited_s": round(time.time() - self.deferred_at, 3), "carry": self.carry}
        )
