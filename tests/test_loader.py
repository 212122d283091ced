"""YAML loader: safe_load, one broken entry does not break the others, strict mode, DagBag parse."""

import os
import time
from pathlib import Path

import pytest

from airflow_backfill_provider.core.exceptions import SpecError
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
    from airflow_backfill_provider.core.compat import AIRFLOW_V_3

    expected = "BackfillOnlyTimetable" if AIRFLOW_V_3 else "CronDataIntervalTimetable"
    assert dag.timetable.__class__.__name__ == expected


def test_dags_folder_parses_with_zero_import_errors():
    """Every DAG in dags/ builds in strict mode. How long parsing takes is printed, not asserted (timing belongs
    to benchmarks); what keeps it fast is that DAG files do no DB, network or heavy import at parse time."""
    from airflow_backfill_provider.core.compat import AIRFLOW_V_3

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


def _dagbag(folder: Path):
    from airflow_backfill_provider.core.compat import AIRFLOW_V_3

    if AIRFLOW_V_3:
        from airflow.dag_processing.dagbag import DagBag

        return DagBag(dag_folder=str(folder))
    from airflow.models.dagbag import DagBag

    return DagBag(dag_folder=str(folder), include_examples=False)


def _dags_folder_with_a_typo(tmp_path: Path) -> Path:
    """The repository's DAG files over three configs: two good, one with ``granularity: daily``."""
    folder = tmp_path / "dags"
    (folder / "configs").mkdir(parents=True)
    for name in ("backfill_dags.py", "live_dags.py", "backfill_config_check.py"):
        (folder / name).write_text((REPO / "dags" / name).read_text())
    (folder / "configs" / "a.yaml").write_text(GOOD.format(name="good_a"))
    (folder / "configs" / "b.yaml").write_text(GOOD.format(name="typo_b") + "granularity: daily\n")
    (folder / "configs" / "c.yaml").write_text(GOOD.format(name="good_c") + "live: {enabled: true}\n")
    return folder


def test_a_broken_config_is_an_import_error_and_the_good_ones_still_load(tmp_path, monkeypatch):
    """Real DagBag over the shipped DAG files: the typo is one import error of backfill_config_check.py naming
    the file, the key, the value and the valid choices; backfill_dags.py has none and loads the good DAGs."""
    monkeypatch.delenv("AIRFLOW_BACKFILL_STRICT", raising=False)
    bag = _dagbag(_dags_folder_with_a_typo(tmp_path))
    assert {"backfill_good_a", "backfill_good_c", "live_good_c"} <= set(bag.dag_ids)
    assert "backfill_typo_b" not in bag.dag_ids
    assert [Path(f).name for f in bag.import_errors] == ["backfill_config_check.py"]
    (message,) = bag.import_errors.values()
    assert "b.yaml" in message and "granularity: 'daily' is not valid" in message
    assert "'day'" in message  # the valid choices, so the fix is in the message
    assert "a.yaml" not in message and "c.yaml" not in message


def test_config_check_is_silent_without_broken_configs(tmp_path, monkeypatch):
    monkeypatch.delenv("AIRFLOW_BACKFILL_STRICT", raising=False)
    folder = _dags_folder_with_a_typo(tmp_path)
    (folder / "configs" / "b.yaml").unlink()
    bag = _dagbag(folder)
    assert bag.import_errors == {}
    assert {"backfill_good_a", "backfill_good_c", "live_good_c"} <= set(bag.dag_ids)


def test_cli_lists_the_import_error_and_keeps_the_good_dag_active(tmp_path, airflow_db, monkeypatch):
    """Through the CLI, on 3.3 and 2.11: `airflow dags list-import-errors` shows the typo and exits 1, and the
    good DAGs are listed (an error raised in backfill_dags.py itself would flag both). 3.3 reads both from the
    metadata DB (written here by `dags reserialize`); 2.11's commands parse the folder themselves."""
    import json
    import subprocess
    import sys

    from airflow_backfill_provider.core.compat import AIRFLOW_V_3

    folder = _dags_folder_with_a_typo(tmp_path)
    airflow = str(Path(sys.executable).with_name("airflow"))
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(folder), "PYTHONPATH": str(REPO)}
    env.pop("AIRFLOW_BACKFILL_STRICT", None)

    def cli(*args: str, rc: int = 0) -> str:
        proc = subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == rc, proc.stderr[-2000:]
        # the JSON line; Airflow may print warnings (graphviz) and, on 2.11, log lines ("[2026-...") before it
        return next((line for line in proc.stdout.splitlines() if line.startswith(("[{", "[]"))), "")

    if AIRFLOW_V_3:
        cli("dags", "reserialize")
    errors = json.loads(cli("dags", "list-import-errors", "-o", "json", rc=1))  # exits 1 on errors: usable in CI
    assert [Path(e["filepath"]).name for e in errors] == ["backfill_config_check.py"]
    assert "granularity: 'daily' is not valid" in errors[0]["error"]
    listed = {d["dag_id"] for d in json.loads(cli("dags", "list", "-o", "json"))}
    assert {"backfill_good_a", "backfill_good_c"} <= listed and "backfill_typo_b" not in listed


RECORD_2_11 = """
import json, logging, sys
from pathlib import Path
from airflow.dag_processing.processor import DagFileProcessor
from airflow.models.dag import DagModel
from airflow.models.errors import ParseImportError
from airflow.utils.session import create_session

folder = sys.argv[1]
processor = DagFileProcessor(dag_ids=None, dag_directory=folder, log=logging.getLogger("record"))
for path in sorted(Path(folder).glob("*.py")):
    processor.process_file(str(path), callback_requests=[])
with create_session() as session:
    errors = [(e.filename, e.stacktrace) for e in session.query(ParseImportError).filter(ParseImportError.filename.startswith(folder))]
    active = [d.dag_id for d in session.query(DagModel).filter(DagModel.fileloc.startswith(folder), DagModel.is_active)]
print(json.dumps({"errors": errors, "active": sorted(active)}))
"""


def test_2_11_the_scheduler_records_the_import_error_the_ui_shows(tmp_path, airflow_db, monkeypatch):
    """2.11's UI (and /api/v1/importErrors) show the import errors its scheduler's DagFileProcessor records in
    the metadata DB: run that processor over the folder; the typo is recorded for backfill_config_check.py only
    and the good DAGs are active."""
    import json
    import subprocess
    import sys

    from airflow_backfill_provider.core.compat import AIRFLOW_V_3

    if AIRFLOW_V_3:
        pytest.skip("Airflow 3's dag-processor: test_cli_lists_the_import_error... and tests/e2e/test_first_hour.py")
    folder = _dags_folder_with_a_typo(tmp_path)
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(folder), "PYTHONPATH": str(REPO)}
    env.pop("AIRFLOW_BACKFILL_STRICT", None)
    proc = subprocess.run([sys.executable, "-c", RECORD_2_11, str(folder)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [Path(f).name for f, _ in recorded["errors"]] == ["backfill_config_check.py"], recorded
    assert "b.yaml" in recorded["errors"][0][1] and "granularity: 'daily' is not valid" in recorded["errors"][0][1]
    assert {"backfill_good_a", "backfill_good_c", "live_good_c"} <= set(recorded["active"])
    assert "backfill_typo_b" not in recorded["active"]
