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
