"""See the backfill, on a real Airflow 3 cluster: progress page, auth, no surprise schedule, assets, lineage.

One cluster (api-server, scheduler, dag-processor, triggerer; LocalExecutor; PostgreSQL metadata DB) with:

* the provider's plugin loaded through its ``airflow.plugins`` entry point, exactly once: the installed
  provider's (``pip install -e .``), or, when none is installed, a dist-info carrying the entry points declared
  in pyproject.toml put on the cluster's PYTHONPATH (a second one makes Airflow drop OpenLineage's listener,
  see ``cluster.code_path``);
* real authentication (SimpleAuthManager with a password, not all-admins), so a request without a valid
  token can be refused;
* OpenLineage's file transport writing every event to a JSON-lines file;
* a downstream DAG scheduled on the destination table's asset.

The browser test (headless Chromium via Playwright) opens the page, directly and as the run's tab in Airflow's
UI, while a run with a failed chunk is still loading; its screenshots are saved under the test's tmp dir (and
``E2E_ARTEFACTS`` if set).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import psycopg2
import pytest
import requests
from psycopg2.extensions import parse_dsn

from tests.e2e.cluster import AirflowCluster, airflow_major, code_path
from tests.e2e.orders_env import (
    DAG_ID,
    POOL,
    POOL_SLOTS,
    inject_fault,
    name_metadata_database,
    remove_fault,
    slow_down,
    write_dags_folder,
)
from tests.e2e.test_ui_trigger import browser  # noqa: F401 (the headless Chromium fixture)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(airflow_major() < 3, reason="the progress page, external views and the timetable are Airflow 3"),
]

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "e2e-progress-pw"
DOWNSTREAM = "orders_downstream"
ASSET_URI = "backfill://backfill_dest_pg/public.orders"
PAGE = "/backfill-progress/dags/" + DAG_ID
DOCS_SHOT = REPO / "docs" / "progress-page.png"

DOWNSTREAM_DAG = f'''
import datetime as dt
from airflow.sdk import DAG, Asset
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("{DOWNSTREAM}", schedule=[Asset("{ASSET_URI}")], start_date=dt.datetime(2023, 1, 1), catchup=False):
    EmptyOperator(task_id="use_orders")
'''


class PasswordCluster(AirflowCluster):
    """The harness's cluster, authenticating with a user's password instead of the all-admins token."""

    def _authenticate(self) -> None:
        resp = self._http.post(
            f"{self.base_url}/auth/token", json={"username": "admin", "password": PASSWORD}, timeout=10
        )
        resp.raise_for_status()
        self.token = resp.json()["access_token"]
        self._http.headers["Authorization"] = f"Bearer {self.token}"


def _installed_plugin_entry_point() -> bool:
    """An installed distribution (site-packages, not the checkout's egg-info) declares the provider's plugin."""
    import importlib.metadata
    import site as site_module

    paths = [*site_module.getsitepackages(), site_module.getusersitepackages()]
    for dist in importlib.metadata.distributions(path=paths):
        if any(
            ep.group == "airflow.plugins" and ep.value.startswith("airflow_backfill_provider.")
            for ep in dist.entry_points
        ):
            return True
    return False


def _entry_point_dist(folder: Path) -> Path:
    """A dist-info holding the entry points pyproject.toml declares: how an installed package is seen."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dist = folder / "airflow_backfill_provider_e2e-0.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: airflow-backfill-provider-e2e\nVersion: 0.0.0\n")
    lines = []
    for group in ("airflow.plugins",):
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in project["entry-points"][group].items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def env(orders, tmp_path_factory):
    home = tmp_path_factory.mktemp("progress")
    dags = write_dags_folder(home / "dags")
    (dags / "downstream.py").write_text(DOWNSTREAM_DAG)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({"admin": PASSWORD}))
    lineage = home / "openlineage.jsonl"
    # the plugin's entry point exactly once: the installed provider's (pip install -e .), else a dist-info of ours
    site = [] if _installed_plugin_entry_point() else [str(_entry_point_dist(home / "site"))]
    cluster = PasswordCluster(
        dags,
        connections={"backfill_source_pg": orders.src_url, "backfill_dest_pg": orders.dst_url},
        pools={POOL: POOL_SLOTS},
        env={
            "AIRFLOW_BACKFILL_STRICT": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(code_path(home / "code")), *site, *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                {"type": "file", "log_file_path": str(lineage), "append": True}
            ),
        },
    )
    name_metadata_database(dags, cluster)
    try:
        cluster.start()
        cluster.wait_for_dag(DAG_ID)
        cluster.wait_for_dag(DOWNSTREAM)
        cluster.unpause(DAG_ID)  # as `airflow backfill create` requires on Airflow 3
        cluster.unpause(DOWNSTREAM)
        yield {"cluster": cluster, "orders": orders, "lineage": lineage, "home": home}
    finally:
        cluster.stop()


def _get(cluster, path: str, **kwargs) -> requests.Response:
    return requests.get(cluster.base_url + path, timeout=30, **kwargs)


def _authed(cluster, path: str) -> requests.Response:
    return _get(cluster, path, headers={"Authorization": f"Bearer {cluster.token}"})


def _db(url: str) -> str:
    return parse_dsn(url)["dbname"]


# ---------------------------------------------------------------------------------------------- tests
def test_plugin_is_loaded_from_its_entry_point(env):
    cluster = env["cluster"]
    plugins = cluster.api("GET", "/plugins")["plugins"]
    ours = next(p for p in plugins if p["name"] == "backfill_provider")
    assert [a["url_prefix"] for a in ours["fastapi_apps"]] == ["/backfill-progress"]
    assert {v["destination"]: v["href"] for v in ours["external_views"]} == {
        "nav": "/backfill-progress/",
        "dag": "/backfill-progress/dags/{DAG_ID}",
        "dag_run": "/backfill-progress/dags/{DAG_ID}?run_id={RUN_ID}",
    }
    assert any("BackfillOnlyTimetable" in t for t in ours["timetables"])


@pytest.mark.parametrize("path", ["/backfill-progress/", PAGE, "/backfill-progress/api/dags/" + DAG_ID])
def test_the_page_is_behind_airflows_auth(env, path):
    cluster = env["cluster"]
    assert _get(cluster, path).status_code == 401  # no token at all
    assert _get(cluster, path, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403
    assert _get(cluster, path, cookies={"_token": "not-a-jwt"}).status_code in (401, 403)
    assert _authed(cluster, path).status_code == 200


def test_unpaused_backfill_dag_schedules_nothing(env):
    cluster = env["cluster"]
    dag = cluster.api("GET", f"/dags/{DAG_ID}")
    assert "backfill only" in (dag.get("timetable_summary") or "") + (dag.get("timetable_description") or "")
    assert dag["next_dagrun_run_after"] is None and dag["is_paused"] is False
    assert cluster.dag_runs(DAG_ID, "scheduled") == []  # checked again at the end of the module


def test_backfill_create_runs_and_the_validated_table_triggers_the_downstream_dag(env):
    cluster = env["cluster"]
    run_ids = cluster.backfill(DAG_ID, "2023-01-10", "2023-01-11")
    assert len(run_ids) == 2
    assert set(cluster.wait_for_runs(DAG_ID, run_ids).values()) == {"success"}

    def events_of_both_runs():
        events = cluster.api("GET", "/assets/events", params={"limit": 100})["asset_events"]
        mine = [e for e in events if (e.get("extra") or {}).get("run_id") in run_ids]
        return mine if {e["extra"]["run_id"] for e in mine} == set(run_ids) else None

    events = cluster.wait_until("an asset event from each backfill run", events_of_both_runs, 60)
    assert {e["uri"] for e in events} == {ASSET_URI}
    by_run = {e["extra"]["run_id"]: e["extra"] for e in events}
    assert by_run[run_ids[0]]["range_start"].startswith("2023-01-10")
    assert by_run[run_ids[0]]["range_end"].startswith("2023-01-11")
    assert by_run[run_ids[1]]["range_start"].startswith("2023-01-11")
    assert by_run[run_ids[0]]["rows"] == 100 and by_run[run_ids[0]]["status"] == "pass"

    def downstream_run_seeing_an_event():
        for r in cluster.dag_runs(DOWNSTREAM, "asset_triggered"):
            seen = cluster.api("GET", f"/dags/{DOWNSTREAM}/dagRuns/{r['dag_run_id']}/upstreamAssetEvents")
            if {(e.get("extra") or {}).get("run_id") for e in seen["asset_events"]} & set(run_ids):
                return r
        return None

    run = cluster.wait_until("a downstream run triggered by the asset event", downstream_run_seeing_an_event, 120)
    assert cluster.wait_for_run(DOWNSTREAM, run["dag_run_id"]) == "success"


def test_lineage_events_name_the_tables_with_schema_and_row_count(env):
    cluster, orders = env["cluster"], env["orders"]

    def completes():
        if not env["lineage"].exists():
            return None
        events = [json.loads(line) for line in env["lineage"].read_text().splitlines() if line.strip()]
        done = [e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"].endswith(".load_chunk")]
        return done if len(done) >= 2 else None

    try:
        events = cluster.wait_until("OpenLineage COMPLETE events of the chunks", completes, 60)
    except AssertionError as err:  # say what was emitted, and what OpenLineage's listener said in the task logs
        raise AssertionError(f"{err}\n{_lineage_evidence(env)}") from err
    event = events[0]
    (inp,), (out,) = event["inputs"], event["outputs"]
    from tests.session_helpers import server_address

    host, port = server_address()
    assert inp["namespace"] == out["namespace"] == f"postgres://{host}:{port}"
    assert inp["name"] == f"{_db(orders.src_url)}.public.orders"
    assert out["name"] == f"{_db(orders.dst_url)}.public.orders"
    columns = {f["name"]: f["type"] for f in out["facets"]["schema"]["fields"]}
    assert columns["created_at"] == "timestamp with time zone" and columns["amount"] == "numeric(12,2)"
    assert {f["name"] for f in inp["facets"]["schema"]["fields"]} >= {"id", "created_at", "updated_at"}
    assert [e["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] for e in events[:2]] == [100, 100]
    starts = [json.loads(line) for line in env["lineage"].read_text().splitlines() if '"START"' in line]
    assert any(e["job"]["name"].endswith(".load_chunk") and e["inputs"] for e in starts)


def _lineage_evidence(env) -> str:
    """Events per (type, job) in the file, and the OpenLineage listener's warnings from the task logs."""
    counts: dict[tuple[str, str], int] = {}
    if env["lineage"].exists():
        for line in env["lineage"].read_text().splitlines():
            if line.strip():
                e = json.loads(line)
                counts[(e["eventType"], e["job"]["name"])] = counts.get((e["eventType"], e["job"]["name"]), 0) + 1
    logs = Path(env["cluster"].home, "logs")
    said = [
        line[:300]
        for f in (logs.rglob("*.log") if logs.exists() else [])
        for line in f.read_text(errors="replace").splitlines()
        if "openlineage" in line.lower()
    ]
    procs = Path(env["cluster"].home, "proc-logs")
    plugin_lines = [
        f"{f.name}: {line[:300]}"
        for f in (procs.glob("*.log") if procs.exists() else [])
        for line in f.read_text(errors="replace").splitlines()
        if "plugin" in line.lower() or "lineage" in line.lower() or "listener" in line.lower()
    ]
    n_logs = len(list(logs.rglob("*.log"))) if logs.exists() else 0
    return (
        f"events by (type, job): {counts}\nOpenLineage lines in {n_logs} task logs ({len(said)}):\n"
        + "\n".join(said[:20])
        + f"\nplugin/lineage/listener lines in component logs ({len(plugin_lines)}):\n"
        + "\n".join(plugin_lines[:20])
    )


def _progress(cluster, run_id: str) -> dict:
    return _authed(cluster, f"/backfill-progress/api/dags/{DAG_ID}?run_id={run_id}").json()


@pytest.mark.browser
def test_browser_sees_the_failed_day_totals_and_eta_during_a_run(env, browser, tmp_path):  # noqa: F811
    cluster, orders = env["cluster"], env["orders"]
    inject_fault(orders, dt.date(2023, 2, 3))
    slow_down(orders, 2.0)  # chunks take a few seconds each: the page is seen while the run is going
    try:
        run_id = cluster.trigger(DAG_ID, {"start": "2023-02-01", "end": "2023-02-15"})

        def failed_while_running():
            p = _progress(cluster, run_id)
            left = p["counts"]["pending"] + p["counts"]["running"] + p["counts"]["deferred"]
            return p if p["counts"]["failed"] and p["counts"]["loaded"] and left >= 2 else None

        seen = cluster.wait_until("a failed chunk while others are still to load", failed_while_running, 180, 0.5)
        assert seen["run_state"] == "running" and seen["total"] == 14

        context = browser.new_context(viewport={"width": 1300, "height": 900})
        context.add_cookies([{"name": "_token", "value": cluster.token, "url": cluster.base_url}])
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{cluster.base_url}{PAGE}?run_id={run_id}")
        failed = page.locator('td[data-day="2023-02-03"]')
        assert failed.get_attribute("data-state") == "failed"
        assert "2023-02-03 failed" in failed.get_attribute("title")
        done = page.locator("#done").inner_text()
        assert re.fullmatch(r"\d+/14 chunks done \(\d+%\)", done), done
        assert re.search(r"rows: [1-9][\d,]* read by this run", page.locator("#rows").inner_text())
        eta = page.locator("#eta").inner_text()
        assert re.fullmatch(r"ETA \d+(\.\d)? (s|min|h)", eta), eta
        assert page.locator('#chunks tr[data-chunk="2023-02-03"]').get_attribute("data-state") == "failed"
        waits = page.locator("#waits").inner_text()  # from the chunks' ledger rows (0 s here: a quiet source)
        assert re.match(r"Waits before reading the source: [\d,]+\.\d s for its load, [\d,]+\.\d s for pacing", waits)
        shots = [tmp_path / "progress-page.png"]
        if os.environ.get("E2E_ARTEFACTS"):
            shots.append(Path(os.environ["E2E_ARTEFACTS"]) / "progress-page.png")
        for shot in shots:
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)

        # the same page inside Airflow's UI: the run's "Backfill progress" tab (an external view, iframed)
        page.goto(f"{cluster.base_url}/dags/{DAG_ID}/runs/{run_id}")
        page.get_by_role("link", name="Backfill progress").click()  # the tab next to "Details"
        frame = page.frame_locator("iframe")
        frame.locator('td[data-day="2023-02-03"][data-state="failed"]').wait_for()
        assert re.fullmatch(r"\d+/14 chunks done \(\d+%\)", frame.locator("#done").inner_text())
        for shot in shots:
            page.screenshot(path=str(shot.with_name("progress-tab-in-airflow-ui.png")), full_page=True)
        if os.environ.get("E2E_UPDATE_DOCS_SCREENSHOT"):
            shutil.copy(shots[0].with_name("progress-tab-in-airflow-ui.png"), DOCS_SHOT)
        context.close()
    finally:
        remove_fault(orders)
        _drop_slow(orders)
    assert cluster.wait_for_run(DAG_ID, run_id) == "failed"
    final = _progress(cluster, run_id)
    assert final["counts"]["failed"] == 1 and final["counts"]["loaded"] == 13
    assert final["eta"] == "unknown (1 failed chunk(s) to clear)"
    cols = final["chunks"]["columns"]
    loaded = [r for r in final["chunks"]["rows"] if r[cols.index("state")] == "loaded"]
    assert all(isinstance(r[cols.index("waited_load_s")], float) for r in loaded)  # measured by each chunk
    assert final["waits"]["load_s"] >= 0 and final["waits"]["deferred_now"] == 0


def _drop_slow(orders) -> None:
    conn = psycopg2.connect(orders.dst_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TRIGGER IF EXISTS e2e_slow ON orders; DROP FUNCTION IF EXISTS e2e_slow()")
    conn.close()


def test_validation_worst_days_on_the_page_and_from_the_terminal(env):
    """Extra destination rows on one day: validation fails, the page and the CLI put that day first; no asset."""
    cluster, orders = env["cluster"], env["orders"]
    conn = psycopg2.connect(orders.dst_url)
    conn.autocommit = True
    with conn.cursor() as cur:  # 5 rows the source never had: 5% more on 2023-01-20, 0% on 2023-01-21
        cur.execute(
            "INSERT INTO orders (id, customer_id, status, amount, created_at, updated_at) "
            "SELECT 90000000 + g, 1, 'new', 1, timestamptz '2023-01-20 12:00+00', timestamptz '2023-01-20 12:00+00' "
            "FROM generate_series(1, 5) g"
        )
    conn.close()
    run_id = cluster.trigger(DAG_ID, {"start": "2023-01-20", "end": "2023-01-22"})
    assert cluster.wait_for_run(DAG_ID, run_id) == "failed"  # validate fails, the chunks loaded

    body = _authed(cluster, f"{PAGE}?run_id={run_id}").text
    assert 'data-day="2023-01-20" data-state="loaded" data-validation="fail"' in body
    assert 'data-day="2023-01-21" data-state="loaded" data-validation=""' in body
    worst = re.search(r"<table class='t' id='worst-days'>.*?</table>", body).group(0)
    assert re.findall(r"<tr><td>(\d{4}-\d\d-\d\d)</td><td>(\w+)</td>", worst) == [("2023-01-20", "FAIL")]
    assert "Validation <b>FAIL</b>" in body

    out = subprocess.run(
        [sys.executable, "-m", "airflow_backfill_provider", "status", DAG_ID, "--run-id", run_id],
        capture_output=True,
        text=True,
        timeout=120,
        env=cluster.env,
        cwd=cluster.home,
    )
    assert out.returncode == 0, out.stderr  # no chunk failed; the validation result is printed
    assert "validation (" in out.stdout and "FAIL, 2 day(s), 0 warn, 1 fail" in out.stdout
    assert re.search(r"worst days:\n  2023-01-20  FAIL  src 100  dst 105  rows off by 5\.00%", out.stdout), out.stdout
    events = cluster.api("GET", "/assets/events", params={"limit": 100})["asset_events"]
    assert run_id not in {e["extra"].get("run_id") for e in events}  # a failed validation emits no asset event


def test_still_no_scheduled_run_after_all_that(env):
    assert env["cluster"].dag_runs(DAG_ID, "scheduled") == []
