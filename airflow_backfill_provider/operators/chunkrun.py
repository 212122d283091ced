"""The state of one try of a task instance's chunks through their gates: probe -> (wait) -> (pace) -> transfer.

A try may defer twice (load wait, pacing turn) and resume in a new worker process, so what the next
step needs travels in the trigger event's ``carry`` (dag.test() on both Airflow versions hands the
resumed method the event only, not defer(kwargs=...)). :class:`ChunkRun` is that state, built fresh
at each step from the event; it also owns the try's source session (the probe's, then the transfers').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_backfill_provider.connections import close_all
from airflow_backfill_provider.throttle.probe import LoadSample


@dataclass
class ChunkRun:
    #: seconds waited so far in this try for the source's load to drop, and for pacing turns
    waited_load_s: float = 0.0
    waited_pacing_s: float = 0.0
    #: the pacing turn was reserved and waited for: go without reserving another
    paced: bool = False
    #: ``sample`` was just taken (by the load trigger): no probe before pacing
    probed: bool = False
    sample: LoadSample | None = None
    #: the try's source session: the probe's, reused by the transfers (one source connection per task instance)
    source_conn: Any = None

    @classmethod
    def after_load_wait(cls, event: dict[str, Any]) -> ChunkRun:
        """Resumed by SourceLoadTrigger with status ok: it probed last, so go straight to pacing."""
        carry = event.get("carry") or {}
        return cls(
            waited_load_s=float(event.get("waited_s") or 0.0),
            waited_pacing_s=float(carry.get("waited_pacing_s", 0.0)),
            probed=True,
            sample=LoadSample.from_dict(event["sample"]),
        )

    @classmethod
    def after_pacing(cls, event: dict[str, Any]) -> ChunkRun:
        """Resumed by PacingTrigger at the chunk's turn: probe again (the load may have changed), then go."""
        carry = event.get("carry") or {}
        return cls(
            waited_load_s=float(carry.get("waited_load_s", 0.0)),
            waited_pacing_s=float(carry.get("waited_pacing_s", 0.0)) + float(event.get("waited_s") or 0.0),
            paced=True,
        )

    def carry_through_load_wait(self) -> dict[str, float]:
        """What SourceLoadTrigger hands back (its own wait is measured from ``started_at``)."""
        return {"waited_pacing_s": self.waited_pacing_s}

    def carry_through_pacing(self) -> dict[str, float]:
        """What PacingTrigger hands back (its own wait is added from the event's ``waited_s``)."""
        return {"waited_load_s": self.waited_load_s, "waited_pacing_s": self.waited_pacing_s}

    def close(self, *others: Any) -> None:
        """Close the try's sessions (the source one, and ``others``): never held across a deferral."""
        close_all(self.source_conn, *others)
        self.source_conn = None
