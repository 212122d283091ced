"""Throwaway DAG that proves the e2e harness, not the product.

A classic operator mapped over days, with the pool in ``.partial()`` and each mapped instance labelled by its
day (``map_index_template``). Each instance records itself in the ``smoke_log`` table of the ``smoke_db``
connection (an ``AIRFLOW_CONN_*`` variable) and fails if its day is listed in ``smoke_fault``: faults are
injected through a table the test controls.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone

import psycopg2

from airflow_backfill_provider.core.compat import (
    DAG,
    AirflowFailException,
    BaseHook,
    BaseOperator,
    CronDataIntervalTimetable,
    Param,
)


class PlanDays(BaseOperator):
    """Returns the days [start, end) from params, or the run's data interval for scheduled/backfill runs."""

    def execute(self, context):
        params = context["params"]
        if params.get("start") and params.get("end"):
            start, end = date.fromisoformat(params["start"]), date.fromisoformat(params["end"])
        else:
            start, end = context["data_interval_start"].date(), context["data_interval_end"].date()
        return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days)]


class TouchDay(BaseOperator):
    template_fields = ("seconds",)

    def __init__(self, *, day: str, seconds: float | str = "{{ params.sleep }}", conn_id: str = "smoke_db", **kwargs):
        super().__init__(**kwargs)
        self.day, self.seconds, self.conn_id = day, seconds, conn_id

    def execute(self, context):
        c = BaseHook.get_connection(self.conn_id)
        conn = psycopg2.connect(host=c.host, port=c.port, user=c.login, password=c.password, dbname=c.schema)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT clock_timestamp()")
                started = cur.fetchone()[0]
                time.sleep(float(self.seconds))
                cur.execute("SELECT 1 FROM smoke_fault WHERE day = %s", (self.day,))
                if cur.fetchone():
                    raise AirflowFailException(f"injected fault for day {self.day} (row in smoke_fault)")
                cur.execute(
                    "INSERT INTO smoke_log (run_id, day, try_number, started, ended) VALUES (%s, %s, %s, %s, clock_timestamp())",
                    (context["run_id"], self.day, context["ti"].try_number, started),
                )
        finally:
            conn.close()


class Done(BaseOperator):
    def execute(self, context):
        return "done"


with DAG(
    dag_id="e2e_smoke",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    default_args={"retries": 0},
    params={
        "start": Param(None, type=["null", "string"], format="date"),
        "end": Param(None, type=["null", "string"], format="date"),
        "sleep": Param(1.0, type="number", minimum=0),
    },
):
    days = PlanDays(task_id="plan")
    touched = TouchDay.partial(task_id="touch", pool="smoke_pool", map_index_template="{{ task.day }}").expand(
        day=days.output
    )
    touched >> Done(task_id="done")
