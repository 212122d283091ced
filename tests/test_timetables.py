"""No surprise schedule: the backfill-only timetable gives backfill intervals and no automatic run."""

from __future__ import annotations

import pendulum
import pytest

from airflow_backfill_provider.core.compat import AIRFLOW_V_3

pytestmark = pytest.mark.skipif(not AIRFLOW_V_3, reason="Airflow 3 only (2.11 keeps the cron timetable)")


@pytest.mark.parametrize(
    "cron,tz", [("0 0 * * *", "UTC"), ("0 * * * *", "America/New_York"), ("0 0 1 * *", "Europe/Berlin")]
)
def test_backfill_intervals_equal_the_cron_timetables_and_no_automatic_run(cron, tz):
    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.interval import CronDataIntervalTimetable

    from airflow_backfill_provider.timetables import BackfillOnlyTimetable

    ours, cron_tt = BackfillOnlyTimetable(cron, tz), CronDataIntervalTimetable(cron, tz)
    start = pendulum.datetime(2024, 3, 1, tz=tz)
    # what the scheduler asks: open end (no end_date), catchup off or on -> never a run
    for catchup in (False, True):
        open_end = TimeRestriction(start, None, catchup)
        assert cron_tt.next_dagrun_info(last_automated_data_interval=None, restriction=open_end) is not None
        assert ours.next_dagrun_info(last_automated_data_interval=None, restriction=open_end) is None
    # what `airflow backfill create` asks: a bounded range -> the cron timetable's intervals, one after another
    bounded = TimeRestriction(start, start.add(days=40), True)
    got, want, last_a, last_b = [], [], None, None
    for _ in range(50):
        a = ours.next_dagrun_info(last_automated_data_interval=last_a, restriction=bounded)
        b = cron_tt.next_dagrun_info(last_automated_data_interval=last_b, restriction=bounded)
        if a is None or b is None:
            assert a is b is None
            break
        got.append(a.data_interval)
        want.append(b.data_interval)
        last_a, last_b = a.data_interval, b.data_interval
    assert got == want and got
    assert all(i.end > i.start for i in got)
    assert "backfill only" in ours.summary and "no automatic runs" in ours.description


def test_serialized_and_back_it_keeps_its_behaviour(monkeypatch):
    """Registered as the plugin registers it, the DAG serializes and the scheduler's copy schedules nothing."""
    from airflow import plugins_manager
    from airflow.serialization.serialized_objects import DagSerialization

    from airflow_backfill_provider import timetables
    from airflow_backfill_provider.factory import build_backfill_dag
    from tests.specs import make_spec

    monkeypatch.setattr(
        plugins_manager, "get_timetables_plugins", lambda: {timetables.IMPORT_PATH: timetables.BackfillOnlyTimetable}
    )
    dag = build_backfill_dag(make_spec())
    assert isinstance(dag.timetable, timetables.BackfillOnlyTimetable)
    back = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert type(back.timetable).__name__ == "BackfillOnlyTimetable"
    infos = list(
        back.iter_dagrun_infos_between(pendulum.datetime(2024, 1, 1, tz="UTC"), pendulum.datetime(2024, 1, 3, tz="UTC"))
    )
    assert [(i.data_interval.start.day, i.data_interval.end.day) for i in infos] == [(1, 2), (2, 3), (3, 4)]


def test_without_the_plugin_the_factory_falls_back_to_the_cron_timetable(monkeypatch):
    from airflow import plugins_manager

    from airflow_backfill_provider import timetables
    from airflow_backfill_provider.factory import build_backfill_dag
    from tests.specs import make_spec

    monkeypatch.setattr(plugins_manager, "get_timetables_plugins", lambda: {})  # the plugin not loaded
    assert not timetables.registered()
    dag = build_backfill_dag(make_spec())
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
