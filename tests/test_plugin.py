"""The provider's Airflow plugin: declared as an entry point; what it registers on 3.x; harmless on 2.11."""

from __future__ import annotations

import importlib
import tomllib

from airflow_backfill_provider.compat import AIRFLOW_V_3
from tests.conftest import REPO


def plugin_class():
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["airflow.plugins"]
    module, _, name = target["backfill_provider"].partition(":")
    return getattr(importlib.import_module(module), name)


def test_entry_point_names_a_valid_airflow_plugin():
    from airflow.plugins_manager import AirflowPlugin

    cls = plugin_class()
    cls.validate()  # what Airflow's plugin loader checks (raises without a name)
    assert issubclass(cls, AirflowPlugin) and cls.name == "backfill_provider"


def test_what_it_registers_for_this_airflow_version():
    cls = plugin_class()
    if AIRFLOW_V_3:
        assert [a["url_prefix"] for a in cls.fastapi_apps] == ["/backfill-progress"]
        assert sorted(v["destination"] for v in cls.external_views) == ["dag", "dag_run", "nav"]
        assert [t.__name__ for t in cls.timetables] == ["BackfillOnlyTimetable"]
    else:  # 2.11: its UI cannot host the page; nothing is registered, nothing breaks
        assert not getattr(cls, "fastapi_apps", []) and not getattr(cls, "external_views", [])
        assert cls.timetables == []


def test_loading_the_plugin_imports_no_web_framework():
    """Task processes load plugins too: the page's FastAPI app is built on its first request only."""
    import subprocess
    import sys

    code = (
        "import sys; import airflow_backfill_provider.ui.plugin as p; p.BackfillProviderPlugin; "
        "print(sorted(m for m in ('fastapi', 'airflow.api_fastapi.core_api.security') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_the_lazy_app_serves_the_page_once_mounted():
    """Mounted as Airflow's API server mounts a plugin app: routes answer (401 without a token)."""
    if not AIRFLOW_V_3:
        return
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    (entry,) = plugin_class().fastapi_apps
    root = FastAPI()
    root.mount(entry["url_prefix"], entry["app"])
    with TestClient(root) as client:
        response = client.get(f"{entry['url_prefix']}/dags/some_dag")
    assert response.status_code in (401, 403), response.text
