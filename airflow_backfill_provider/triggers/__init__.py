"""Triggers that let chunks wait without holding a worker slot."""

from __future__ import annotations

import asyncio
import time


async def hold_until(not_before: float | None, *, lead_s: float = 0.0, cap_s: float | None = None) -> None:
    """Sleep until ``not_before - lead_s`` (epoch seconds; at most ``cap_s``): a trigger's event must not come
    sooner than ``throttle.min_defer_s`` after the chunk deferred (core/spec.py says why: Airflow's scheduler may
    still be processing the deferral and fail a chunk resumed before it has)."""
    if not_before is None:
        return
    delay = not_before - lead_s - time.time()
    if cap_s is not None:
        delay = min(delay, cap_s)
    if delay > 0:
        await asyncio.sleep(delay)
