"""YAML loader: safe_load, one broken entry does not break the others, strict mode, DagBag parse."""

import os
import time
from pathlib import Path

import pytest

from airflow_backfill_provider.exceptions import SpecError
from airflow_backfill_provider.loader import load_backfill_dags

REPO = Path(__file__).resolve().parents[1]

GOOD = """
name: {name}
source_conn_id: src
destination_conn_id: dst
source_table: orders
destination_table: orders
time_column: created_at
key_columns: [id]
"""


def test_one_broken_entry_does_not_break_the_others(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD.format(name="good_a"))
    (tmp_path / "b.yaml").write_text(GOOD.format(name="bad_b") + "granularity: fortnight\n")
    (tmp_path / "c.yml").write_text(
        "backfills:\n  - {name: good_c, source_conn_id: s, destination_conn_id: d, "
        "source_table: o, destination_table: o, time_column: t, key_columns: [id]}\n"
        "  - {name: bad_c}\n"
    )
    (tmp_path / "d.yaml").write_text("name: [unclosed\n")
    (tmp_path / "e.yaml").write_text("!!python/object/apply:os.system ['echo pwned']\n")
    result = load_backfill_dags(tmp_path, strict=False)
    assert sorted(result.dags) == ["backfill_good_a", "backfill_good_c"]
    assert set(result.errors) == {"b.yaml", "c.yml[1]", "d.yaml", "e.yaml"}
    assert "granularity" in result.errors["b.yaml"] and "fortnight" in result.errors["b.yaml"]


def test_strict_mode_raises(tmp_path):
    (tmp_path / "b.yaml").write_text(GOOD.format(name="bad") + "timezone: Nowhere/Land\n")
    with pytest.raises(SpecError, match="timezone"):
        load_backfill_dags(tmp_path, strict=True)


def test_duplicate_dag_ids_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD.format(name="same"))
    (tmp_path / "b.yaml").write_text(GOOD.format(name="same"))
    result = load_backfill_dags(tmp_path, strict=False)
    assert "defined twice" in result.errors["b.yaml"]


def test_built_dag_shape(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD.format(name="shape") + "pool: src_pool\ntimezone: America/New_York\n")
    dag = load_backfill_dags(tmp_path, strict=True).dags["backfill_shape"]
    assert set(dag.task_ids) >= {"plan", "load_chunk"}
    load = dag.get_task("load_chunk")
    assert load.partial_kwargs["pool"] == "src_pool"
    assert "chunk_id" in load.partial_kwargs["map_index_template"]
    assert set(dag.params) >= {"start", "end", "granularity", "reprocess", "dry_run"}
    # Airflow 3 (the provider's plugin registers it): the backfill-only timetable (timetables.py), the same data
    # intervals and no automatic runs; Airflow 2.11: the cron data-interval timetable
    from airflow_backfill_provider.compat import AIRFLOW_V_3

    expected = "BackfillOnlyTimetable" if AIRFLOW_V_3 else "CronDataIntervalTimetable"
    assert dag.timetable.__class__.__name__ == expected


def test_dags_folder_parses_with_zero_import_errors():
    """Every DAG in dags/ builds in strict mode. How long parsing takes is printed, not asserted (timing belongs
    to benchmarks); what keeps it fast is that DAG files do no DB, network or heavy import at parse time."""
    from airflow_backfill_provider.compat import AIRFLOW_V_3

    if AIRFLOW_V_3:
        from airflow.dag_processing.dagbag import DagBag

        kwargs = {}
    else:
        from airflow.models.dagbag import DagBag

        kwargs = {"include_examples": False}
    os.environ["AIRFLOW_BACKFILL_STRICT"] = "1"
    try:
        t0 = time.monotonic()
        bag = DagBag(dag_folder=str(REPO / "dags"), **kwargs)
        elapsed = time.monotonic() - t0
    finally:
        del os.environ["AIRFLOW_BACKFILL_STRICT"]
    assert bag.import_errors == {}
    assert "backfill_orders" in bag.dag_ids
    print(f"dags/ parsed in {elapsed:.2f}s")
