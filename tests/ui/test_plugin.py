"""The provider's Airflow plugin: declared as an entry point; what it registers on 3.x; harmless on 2.11."""

from __future__ import annotations

import importlib
import tomllib

import pytest

from airflow_backfill_provider.core.compat import AIRFLOW_V_3
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


@pytest.mark.heavy  # a fresh interpreter importing Airflow: seconds
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


def _per_dag_auth_manager():
    """Airflow's SimpleAuthManager with per-DAG read rules, as a real deployment's auth manager (FAB roles,
    Keycloak...) has them: alice may read backfill_a only, bob both. Plugged in through ``[core]
    auth_manager`` like any auth manager; everything else (tokens, users, roles) is Airflow's own."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    class PerDagAuthManager(SimpleAuthManager):
        READS = {"alice": {"backfill_a"}, "bob": {"backfill_a", "backfill_b"}}

        def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
            if details is not None and details.id and details.id not in self.READS.get(user.username, set()):
                return False
            return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)

    return PerDagAuthManager


def test_the_index_lists_only_the_dags_the_user_may_read(airflow_db, monkeypatch):
    """Issue 24 item 10: the index asks Airflow's auth manager per DAG, as the DAG pages do (they answer 403)."""
    if not AIRFLOW_V_3:
        return  # 2.11: no page (status command only)
    import airflow.api_fastapi.app as api_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.models.dag import DagModel, DagTag
    from airflow.models.dagbundle import DagBundleModel
    from airflow.utils.session import create_session
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    with create_session() as session:  # three DAGs in the metadata DB: two backfill DAGs and another one
        if session.get(DagBundleModel, "dags-folder") is None:
            session.add(DagBundleModel(name="dags-folder"))
            session.flush()
        for dag_id, tag in (("backfill_a", "backfill"), ("backfill_b", "backfill"), ("other", "etl")):
            session.merge(DagModel(dag_id=dag_id, bundle_name="dags-folder", fileloc=f"/dags/{dag_id}.py"))
            session.flush()
            session.merge(DagTag(name=tag, dag_id=dag_id))
    cls = _per_dag_auth_manager()
    monkeypatch.setattr(api_app._AuthManagerState, "instance", cls())  # what init_auth_manager() builds
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "test-secret-for-this-test-only")
    auth_manager = api_app.get_auth_manager()

    (entry,) = plugin_class().fastapi_apps
    root = FastAPI()
    root.mount(entry["url_prefix"], entry["app"])

    def token(name: str) -> str:
        return auth_manager.generate_jwt(SimpleAuthManagerUser(username=name, role="viewer"))

    def get(path: str, name: str | None):
        headers = {"Authorization": f"Bearer {token(name)}"} if name else {}
        return client.get(f"{entry['url_prefix']}{path}", headers=headers)

    with TestClient(root) as client:
        assert get("/", None).status_code == 401  # still needs a login
        alice, bob = get("/", "alice"), get("/", "bob")
        assert alice.status_code == bob.status_code == 200, alice.text
        assert 'href="dags/backfill_a"' in alice.text and "backfill_b" not in alice.text
        assert 'href="dags/backfill_a"' in bob.text and 'href="dags/backfill_b"' in bob.text
        assert "other" not in bob.text  # not a backfill DAG
        # the same rule as the DAG page's own: alice's forbidden DAG answers 403 there
        assert get("/dags/backfill_b", "alice").status_code == 403
