"""``BackfillProviderPlugin``: registered by the entry point ``airflow.plugins`` of this package.

Airflow 3.1+: a FastAPI app mounted at ``/backfill-progress`` (the progress page and its JSON), linked from the
UI as external views (a "Backfill progress" tab on each DAG and DAG run page, and an entry in the nav bar), and
the :class:`~airflow_backfill_provider.timetables.BackfillOnlyTimetable`.

Airflow 2.11: its UI cannot host the page (no FastAPI apps, external views or React apps): the plugin registers
nothing there and ``python -m airflow_backfill_provider status`` is the progress view.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_backfill_provider.compat import AIRFLOW_V_3
from airflow_backfill_provider.timetables import BackfillOnlyTimetable

URL_PREFIX = "/backfill-progress"


def _fastapi_apps() -> list[dict]:
    from airflow_backfill_provider.ui.app import create_app

    return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Backfill progress"}]


def _external_views() -> list[dict]:
    return [
        {"name": "Backfill progress", "href": f"{URL_PREFIX}/", "destination": "nav", "url_route": "backfill_progress",
         "category": "browse"},
        {"name": "Backfill progress", "href": f"{URL_PREFIX}/dags/{{DAG_ID}}", "destination": "dag",
         "url_route": "backfill_progress_dag"},
        {"name": "Backfill progress", "href": f"{URL_PREFIX}/dags/{{DAG_ID}}?run_id={{RUN_ID}}",
         "destination": "dag_run", "url_route": "backfill_progress_run"},
    ]  # fmt: skip


class BackfillProviderPlugin(AirflowPlugin):
    name = "backfill_provider"
    timetables = [BackfillOnlyTimetable] if BackfillOnlyTimetable is not None else []
    if AIRFLOW_V_3:
        fastapi_apps = _fastapi_apps()
        external_views = _external_views()
