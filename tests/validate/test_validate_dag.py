"""The validation task inside a real Airflow run (``airflow dags test``): log table, summary row, failure.

Runs the factory's DAG (plan >> load_chunk[mapped] >> validate) with a historical-mode spec against
throwaway databases, then a validate-only DAG after corrupting one day. Each ``airflow`` call takes
~10-25 s on a small machine; marked e2e so a quick run can deselect it (``-m "not e2e"``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.prepare.test_drift import DESTINATION, HISTORICAL, SOURCE

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))

DAG_FILE = textwrap.dedent(
    """
    import json, os
    from airflow_backfill_provider.factory import build_backfill_dag
    from airflow_backfill_provider.core.compat import DAG
    from airflow_backfill_provider.operators.validate import ValidateBackfillOperator
    import pendulum

    spec = json.loads(os.environ["BF_TEST_SPEC"])
    dag = build_backfill_dag(spec)
    with DAG("validate_only", schedule=None, start_date=pendulum.datetime(2021, 1, 1), catchup=False) as v:
        ValidateBackfillOperator(
            task_id="validate", spec=spec, start="{{ dag_run.conf['start'] }}", end="{{ dag_run.conf['end'] }}"
        )
    """
)


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home")
    (home / "dags").mkdir()
    (home / "dags" / "backfill_test_dags.py").write_text(DAG_FILE)
    env = dict(
        os.environ,
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([AIRFLOW, "pools", "set", "backfill_source", "4", "test"], env=env, check=True, capture_output=True)
    return env


def dags_test(env, dag_id: str, conf: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AIRFLOW, "dags", "test", dag_id, "-c", json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_validate_task_in_a_real_run(airflow_env, src_url, dst_url, pg):
    with pg(src_url).cursor() as cur:
        cur.execute(SOURCE)
    with pg(dst_url).cursor() as cur:
        cur.execute(DESTINATION)
    spec = dict(
        name="orders_drift",
        source_conn_id="bf_test_src",
        destination_conn_id="bf_test_dst",
        source_table="public.orders",
        destination_table="public.orders",
        time_column="created_at",
        key_columns=["id"],
        version_column="updated_at",
        granularity="week",
        timezone="UTC",
        historical=HISTORICAL,
        validation={"sum_columns": ["amount"]},
        watermark={"enabled": False},
    )
    env = dict(
        airflow_env, BF_TEST_SPEC=json.dumps(spec), AIRFLOW_CONN_BF_TEST_SRC=src_url, AIRFLOW_CONN_BF_TEST_DST=dst_url
    )
    conf = {"start": "2021-05-24", "end": "2021-06-09"}

    run = dags_test(env, "backfill_orders_drift", conf)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    # drift decisions: logged by the plan once per source table, not once per chunk
    # (2.11 prints each task log record twice, with two timestamp formats: count distinct messages)
    decisions = sorted(
        {line.split("Schema decision for", 1)[1] for line in out.splitlines() if "Schema decision for" in line}
    )
    assert sum("channel: missing in source" in line for line in decisions) == 1, decisions
    assert sum('amount: expression ("Amount Cents" / 100.0)' in line for line in decisions) == 1, decisions
    # the per-day table is in the validate task's log
    assert (
        "Validation of public.orders [2021-05-24T00:00:00+00:00, 2021-06-09T00:00:00+00:00) per day in UTC: PASS" in out
    )
    with pg(dst_url).cursor() as cur:
        cur.execute("SELECT dag_id, status, days, source_rows, destination_rows FROM public.backfill_validation")
        assert cur.fetchall() == [("backfill_orders_drift", "pass", 16, 64, 64)]
        cur.execute("SELECT count(*) FROM public.orders")
        assert cur.fetchone()[0] == 64
        # one archive-era day loses a row: the next validation fails and names it
        cur.execute("DELETE FROM public.orders WHERE id = 17")  # 2021-05-28 00:00
        # another day: one amount altered by a cent, its day's sum off by 0.01% (under the 0.10% warn threshold):
        # the checksum fails it, and that is its reason everywhere (never "sum off by 0.01%", nor "100%")
        cur.execute("UPDATE public.orders SET amount = amount + 0.01 WHERE id = 49")  # 2021-06-05 00:00

    run = dags_test(env, "validate_only", conf)
    out = run.stdout + run.stderr
    assert run.returncode != 0 or "state=failed" in out, out[-4000:]
    checksum_reason = (
        "checksum of the loaded columns differs: a value differs (counts and sums within thresholds: "
        "sum(amount) off by 0.01%)"
    )
    rows_reason = (
        "rows off by 25.00%, sum(amount) off by 24.77% (over fail_threshold 1.00%); "
        "the checksum of the loaded columns differs too"
    )
    # the failure message and the log name the same reason per day (progress.day_reason)
    assert (
        f"2 of 16 day(s) of public.orders differ by more than fail_threshold=1.00%; worst 2021-05-28: {rows_reason};"
        in out
    ), out[-4000:]
    assert "off by 100.00%" not in out
    assert f"Validation FAIL on 2021-06-05: {checksum_reason}" in out
    assert f"Validation FAIL on 2021-05-28: {rows_reason}" in out
    table_line = next(line for line in out.splitlines() if line.lstrip().startswith("2021-05-28"))
    assert "FAIL" in table_line and "25.00%" in table_line
    with pg(dst_url).cursor() as cur:
        cur.execute("SELECT status, days_fail FROM public.backfill_validation ORDER BY id")
        assert cur.fetchall() == [("pass", 0), ("fail", 2)]
    # ... and so do the progress page and the status command, from the stored summary
    from airflow_backfill_provider.observe.progress import build_progress, format_text, read_validation
    from airflow_backfill_provider.core.spec import load_spec

    full = load_spec(spec)
    with pg(dst_url) as conn:
        v = read_validation(conn, full, dag_id="validate_only", run_id=None)
    p = build_progress(full, dag_id="validate_only", run=None, ledger_rows=[], task_states=[], validation=v)
    text = format_text(p)
    assert f"2021-06-05  FAIL  src 4  dst 4  {checksum_reason}" in text, text
    assert f"2021-05-28  FAIL  src 4  dst 3  {rows_reason}" in text, text
    if importlib.util.find_spec("fastapi"):  # the page: Airflow 3's API server
        import html

        from airflow_backfill_provider.ui.app import _validation

        page = _validation(p)
        assert html.escape(checksum_reason) in page and html.escape(rows_reason) in page
