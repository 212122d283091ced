"""``BackfillProviderPlugin``: registered by the entry point ``airflow.plugins`` of this package.

Airflow 3.1+: a FastAPI app mounted at ``/backfill-progress`` (the progress page and its JSON), linked from the
UI as external views (a "Backfill progress" tab on each DAG and DAG run page, and an entry in the nav bar), and
the :class:`~airflow_backfill_provider.timetables.BackfillOnlyTimetable`.

Airflow 2.11: its UI cannot host the page (no FastAPI apps, external views or React apps): the plugin registers
nothing there and ``python -m airflow_backfill_provider status`` is the progress view.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_backfill_provider.core.compat import AIRFLOW_V_3
from airflow_backfill_provider.timetables import BackfillOnlyTimetable

URL_PREFIX = "/backfill-progress"


class LazyApp:
    """The progress page's ASGI app, built on its first request.

    Every Airflow process loads plugins, task processes too (each mapped chunk is one), and building the
    FastAPI app imports FastAPI and Airflow's API security and ORM modules: ~1.7 s of CPU per task
    instance on a 2-core machine, for a page only the API server serves. Airflow mounts any ASGI app
    (``app.mount(url_prefix, app)``), so it gets this one, which imports nothing until it is called.
    """

    def __init__(self) -> None:
        self._app = None

    @property
    def app(self):
        if self._app is None:
            from airflow_backfill_provider.ui.app import create_app

            self._app = create_app()
        return self._app

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


def _fastapi_apps() -> list[dict]:
    return [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "Backfill progress"}]


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
