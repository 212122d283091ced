"""Import paths that live outside this repository and must keep working whatever the package's layout
(scripts/relayout.py moves modules into stage subpackages but not these):

- what users' DAG files import (README quick start, docs/configuration.md, docs/live-and-swap.md);
- class paths Airflow stores: an operator's module in the serialized DAG, a trigger's classpath in the trigger
  rows of deferred tasks, the timetable's class path in the serialized DAG (found again through the plugin);
- the entry points (provider info, the plugin) and ``python -m airflow_backfill_provider``.

A stored class path needs the class DEFINED at that path: a re-export would serialize the new module's name.
"""

from __future__ import annotations

import importlib
import importlib.util
import tomllib

import pytest

from airflow_backfill_provider import get_provider_info
from airflow_backfill_provider.core.compat import AIRFLOW_V_3
from tests.conftest import REPO

#: module -> names users' DAG files and docs import from it
USER_PATHS = {
    "airflow_backfill_provider.loader": ["register", "load_backfill_dags"],
    "airflow_backfill_provider.configcheck": ["raise_config_errors"],
    "airflow_backfill_provider.factory": ["build_backfill_dag"],
    "airflow_backfill_provider.live_factory": ["build_live_dag", "register_live"],
    "airflow_backfill_provider.live": ["run_live_ingest"],
}

#: classes whose module Airflow stores (serialized DAGs, trigger rows): they must be defined there
STORED_CLASSES = {
    "airflow_backfill_provider.operators.plan": "PlanBackfillOperator",
    "airflow_backfill_provider.operators.chunk": "BackfillChunkOperator",
    "airflow_backfill_provider.operators.merge": "MergeBackfillOperator",
    "airflow_backfill_provider.operators.live": "LiveIngestOperator",
    "airflow_backfill_provider.operators.validate": "ValidateBackfillOperator",
    "airflow_backfill_provider.triggers.load": "SourceLoadTrigger",
    "airflow_backfill_provider.triggers.pacing": "PacingTrigger",
    "airflow_backfill_provider.triggers.maintenance": "MaintenanceTrigger",
    "airflow_backfill_provider.ui.plugin": "BackfillProviderPlugin",
}


@pytest.mark.parametrize("module", sorted(USER_PATHS))
def test_user_import_paths(module):
    mod = importlib.import_module(module)
    missing = [name for name in USER_PATHS[module] if not callable(getattr(mod, name, None))]
    assert not missing, f"{module} lost {missing}"


@pytest.mark.parametrize("module", sorted(STORED_CLASSES))
def test_stored_class_paths_are_defined_where_they_are_stored(module):
    cls = getattr(importlib.import_module(module), STORED_CLASSES[module])
    assert f"{cls.__module__}.{cls.__qualname__}" == f"{module}.{STORED_CLASSES[module]}"


def test_timetable_class_path():
    from airflow_backfill_provider import timetables

    assert callable(timetables.backfill_timetable)
    if AIRFLOW_V_3:  # 2.11 has no backfill-only timetable
        assert timetables.IMPORT_PATH == "airflow_backfill_provider.timetables.BackfillOnlyTimetable"


def test_entry_points_and_main_resolve():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    targets = [*project["entry-points"]["apache_airflow_provider"].values()]
    targets += [*project["entry-points"]["airflow.plugins"].values()]
    assert "airflow_backfill_provider.ui.plugin:BackfillProviderPlugin" in targets
    for target in targets:
        module, _, name = target.partition(":")
        assert getattr(importlib.import_module(module), name), target
    assert importlib.util.find_spec("airflow_backfill_provider.__main__") is not None


def test_provider_info_modules_import():
    info = get_provider_info()
    modules = [m for kind in ("operators", "triggers") for entry in info[kind] for m in entry["python-modules"]]
    assert modules
    for module in modules:
        importlib.import_module(module)
