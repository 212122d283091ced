"""No surprise schedule: a backfill DAG's timetable has data intervals for backfills but no automatic runs.

On Airflow 3, ``airflow backfill create`` only runs a DAG that is unpaused, and unpausing a DAG with a cron
timetable also starts its scheduled runs (one for the latest interval at once, then one per period). A
backfill DAG exists to load history on request, so by default it gets :class:`BackfillOnlyTimetable`:

* ``airflow backfill create --from-date A --to-date B`` works: it asks the timetable for the intervals
  between two dates, and gets the same ``[period start, next period start)`` intervals as the cron timetable;
* the scheduler asks for the next automatic run with an open end (no ``end_date``): it gets none, so an
  unpaused backfill DAG creates no run by itself;
* manual runs (trigger form) are unaffected.

A custom timetable must be registered by a plugin to be serialized: the provider's plugin
(entry point ``airflow.plugins``) registers it. Where the plugin is not loaded (the provider not installed
as a package, or Airflow 2.11, where ``airflow dags backfill`` needs no unpausing) the factory falls back to
the cron timetable and says so in the log. ``schedule_runs: true``-style periodic loading is the live-ingest
DAG's job, not the backfill DAG's.
"""

from __future__ import annotations

import logging

from airflow_backfill_provider.core.compat import AIRFLOW_V_3

log = logging.getLogger(__name__)

if AIRFLOW_V_3:
    from airflow.timetables.interval import CronDataIntervalTimetable as _CoreCron

    class BackfillOnlyTimetable(_CoreCron):
        """Cron data intervals for backfills and manual runs; never an automatic scheduled run."""

        def __init__(self, cron, timezone) -> None:
            super().__init__(cron, timezone)
            self.description = f"backfill only ({self.description or self._expression}): no automatic runs"

        @property
        def summary(self) -> str:
            return f"backfill only ({self._expression})"

        def next_dagrun_info(self, *, last_automated_data_interval, restriction):
            # the scheduler asks with an open end (the DAG's end_date, which backfill DAGs do not set);
            # `airflow backfill create` asks for the intervals up to its --to-date
            if restriction.latest is None:
                return None
            return super().next_dagrun_info(
                last_automated_data_interval=last_automated_data_interval, restriction=restriction
            )

    IMPORT_PATH = f"{BackfillOnlyTimetable.__module__}.{BackfillOnlyTimetable.__qualname__}"
else:  # Airflow 2.11: `airflow dags backfill` runs paused DAGs; nothing to prevent
    BackfillOnlyTimetable = None  # type: ignore[assignment,misc]
    IMPORT_PATH = ""


def registered() -> bool:
    """True when Airflow's plugins registered the timetable (so DAGs using it can be serialized)."""
    if BackfillOnlyTimetable is None:
        return False
    try:
        from airflow import plugins_manager

        return IMPORT_PATH in plugins_manager.get_timetables_plugins()
    except Exception:  # plugins failing to load must not break DAG parsing
        log.exception("Could not read Airflow's registered timetables")
        return False


def backfill_timetable(cron: str, timezone: str):
    """The backfill DAG's timetable: backfill-only when registered, else the cron data-interval one."""
    if registered():
        return BackfillOnlyTimetable(cron, timezone)
    from airflow_backfill_provider.core.compat import CronDataIntervalTimetable

    if AIRFLOW_V_3:
        log.warning(
            "BackfillOnlyTimetable is not registered (the provider's plugin is not loaded: install the package "
            "so its 'airflow.plugins' entry point is seen); falling back to a cron timetable, so unpausing the "
            "DAG also starts scheduled runs"
        )
    return CronDataIntervalTimetable(cron, timezone=timezone)
