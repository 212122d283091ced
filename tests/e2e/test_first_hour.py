"""The first hour of a real user (issue 24), on Airflow 3.3 with real components and headless Chromium.

One cluster (api-server, scheduler, dag-processor, triggerer; LocalExecutor; PostgreSQL metadata DB) for every
step, run in file order:

1. the provider comes from its **built wheel**, not the checkout: ``pip wheel`` once, then ``pip install
   --no-deps`` of that wheel into a fresh virtualenv whose other packages are this venv's (a ``.pth`` adds a
   folder of links to this venv's site-packages, minus the editable install's entries). The components run
   with that interpreter, so the package, its ``apache_airflow_provider`` and ``airflow.plugins`` entry points
   and its metadata are the wheel's, once; the dependencies are the pins this venv was installed with (what a
   ``pip install`` with constraints gives a user). ``make wheel-check`` installs it with its dependencies into
   a venv of its own too; this keeps the end-to-end cost at seconds;
2. a user's DAGs folder: the quick start's DAG files and ``configs/events.yaml`` taken from README.md, the
   source connection as ``AIRFLOW_CONN_*``, the destination with ``airflow connections add`` and the pool with
   ``airflow pools set`` as the README says; an own table (uuid key, jsonb, numeric(12,2), timestamptz) whose
   destination has a destination-only ``loaded_at timestamptz NOT NULL DEFAULT now()``;
3. trigger from the UI's form; one day fails for a real reason (a destination CHECK a source row violates);
   the progress page shows this run's figures and that reason; fix the cause, clear the failed chunk, it loads;
4. ``airflow backfill create`` over a range; the whole-backfill view (page with ``backfill_id``, ``status
   --backfill``);
5. a spec naming a pool that does not exist: the page and ``status`` name it with the ``airflow pools set``
   command; run that command and the chunks load;
6. a broken spec: an import error in the UI and ``airflow dags list-import-errors``, the other DAGs still load.

Screenshots go to ``E2E_ARTEFACTS`` (default: a folder under pytest's tmp dir); ``scripts/docs_screenshots.py``
copies them to docs/img/.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import quote

import psycopg2
import pytest
import requests

from tests.e2e.cluster import AirflowCluster, airflow_major
from tests.e2e.test_ui_trigger import browser  # noqa: F401 (the headless Chromium fixture)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(airflow_major() < 3, reason="the first hour is walked on Airflow 3 (UI, backfill create)"),
    pytest.mark.timeout(420),
]

REPO = Path(__file__).resolve().parents[2]
DAG = "backfill_events"
NOPOOL_DAG = "backfill_events_nopool"
MISSING_POOL = "backfill_reports"
SEED_START = dt.date(2023, 1, 1)
SEED_DAYS = 12
ROWS_PER_DAY = 40
BROKEN_DAY = dt.date(2023, 1, 4)
#: screenshots this test writes; scripts/docs_screenshots.py copies exactly these to docs/img/
SCREENSHOTS = (
    "first-hour-trigger-form.png",
    "first-hour-failed-day.png",
    "first-hour-whole-backfill.png",
    "first-hour-missing-pool.png",
    "first-hour-import-error.png",
)

SOURCE_DDL = """
CREATE TABLE public.events (
    id uuid PRIMARY KEY,
    payload jsonb NOT NULL,
    amount numeric(12,2) NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
"""
# the destination's own column, filled by its DEFAULT; the CHECK is what a source row of BROKEN_DAY violates
DEST_DDL = """
CREATE TABLE public.events (
    id uuid PRIMARY KEY,
    payload jsonb NOT NULL,
    amount numeric(12,2) NOT NULL CONSTRAINT amount_not_negative CHECK (amount >= 0),
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now()
);
"""
SEED = """
INSERT INTO public.events
SELECT md5('event' || d || '-' || i)::uuid,
       jsonb_build_object('n', i, 'tags', jsonb_build_array('a', d), 'note', 'ü ' || i),
       round((i * 7.31)::numeric %% 500, 2),
       %(start)s::timestamptz + d * interval '1 day' + i * interval '30 minutes',
       %(start)s::timestamptz + d * interval '1 day' + i * interval '30 minutes' + interval '1 hour'
FROM generate_series(0, %(days)s - 1) d, generate_series(0, %(per_day)s - 1) i;
-- a refund: the one row the destination's CHECK refuses
UPDATE public.events SET amount = -12.50 WHERE id = md5('event' || %(broken)s || '-7')::uuid;
"""


# ------------------------------------------------------------------------------------------ helpers
def _sql(url: str, statement: str, params=None) -> list[tuple]:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _digest(url: str, lo: dt.date, hi: dt.date) -> tuple[int, str]:
    """(rows, md5 of the source's columns in key order) of events created in [lo, hi)."""
    return _sql(
        url,
        "SELECT count(*), md5(coalesce(string_agg(concat_ws('|', id, payload, amount, created_at, updated_at), "
        "',' ORDER BY id), '')) FROM public.events WHERE created_at >= %s AND created_at < %s",
        (dt.datetime.combine(lo, dt.time(), dt.UTC), dt.datetime.combine(hi, dt.time(), dt.UTC)),
    )[0]


def readme_block(first_line: str) -> str:
    """The README's code block that starts with ``first_line``: the quick start is tested as written."""
    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```\w*\n(.*?)```", text, flags=re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"README.md has no code block starting with {first_line!r}")


def build_wheel_venv(work: Path) -> Path:
    """The provider's wheel installed (no deps) into a fresh venv that borrows this venv's other packages.

    Returns the fresh venv's folder; its ``bin/airflow`` runs Airflow with that interpreter.
    """
    src = work / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "airflow_backfill_provider", src / "airflow_backfill_provider",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(work / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (work / "dist").glob("airflow_backfill_provider-*.whl")

    venv = work / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # this venv's packages, minus the editable install of the checkout (its dist-info would be a second
    # distribution of the provider, its finder a second source of the package)
    deps = work / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "airflow_backfill_provider" not in entry.name:
            (deps / entry.name).symlink_to(entry)
    purelib = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    # processed after the venv's own site-packages, so the wheel's files come first; addsitedir runs the .pth
    # files of the linked packages (namespace packages and the like) as in the venv they come from
    Path(purelib, "zz_borrowed_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    airflow = venv / "bin" / "airflow"
    airflow.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom airflow.__main__ import main\nsys.exit(main())\n"
    )
    airflow.chmod(0o755)
    return venv


class Walk:
    """What the steps share: the cluster, the databases, the fresh venv, the screenshots folder."""

    def __init__(self, cluster: AirflowCluster, src: str, dst: str, venv: Path, shots: Path, dags: Path):
        self.cluster, self.src, self.dst, self.venv, self.shots, self.dags = cluster, src, dst, venv, shots, dags
        self.token = cluster._http.headers["Authorization"].split(" ", 1)[1]
        self.form_run: str | None = None

    @property
    def site(self) -> str:
        return str(self.venv / "lib")

    def progress(self, dag_id: str, **params) -> dict:
        resp = requests.get(f"{self.cluster.base_url}/backfill-progress/api/dags/{dag_id}", params=params,
                            headers={"Authorization": f"Bearer {self.token}"}, timeout=60)  # fmt: skip
        assert resp.status_code == 200, resp.text[:2000]
        return resp.json()

    def status(self, *args: str) -> subprocess.CompletedProcess:
        """``python -m airflow_backfill_provider status`` with the cluster's interpreter and environment."""
        return subprocess.run(
            [str(self.venv / "bin" / "python"), "-m", "airflow_backfill_provider", "status", *args],
            capture_output=True, text=True, timeout=120, env=self.cluster.env, cwd=self.cluster.home,
        )  # fmt: skip

    def page(self, browser, path: str):  # noqa: F811
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.add_cookies([{"name": "_token", "value": self.token, "url": self.cluster.base_url}])
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(self.cluster.base_url + path)
        return context, page

    def shot(self, page, name: str) -> None:
        assert name in SCREENSHOTS
        page.screenshot(path=str(self.shots / name), full_page=True)


@pytest.fixture(scope="module")
def walk(databases, tmp_path_factory):
    work = tmp_path_factory.mktemp("first-hour")
    t0 = time.monotonic()
    venv = build_wheel_venv(work)
    built = time.monotonic() - t0
    src, dst = databases.create("fh_src"), databases.create("fh_dst")
    _sql(src, SOURCE_DDL)
    _sql(src, SEED, {"start": SEED_START.isoformat() + " 00:00+00", "days": SEED_DAYS, "per_day": ROWS_PER_DAY,
                     "broken": (BROKEN_DAY - SEED_START).days})  # fmt: skip
    _sql(dst, DEST_DDL)

    # the user's DAGs folder, from the README's quick start
    dags = work / "dags"
    (dags / "configs").mkdir(parents=True)
    (dags / "backfill_dags.py").write_text(readme_block("# dags/backfill_dags.py"))
    (dags / "backfill_config_check.py").write_text(readme_block("# dags/backfill_config_check.py"))
    # the README's spec; only the latency budget off: this test shares its PostgreSQL and its 2 cores with other
    # runs, whose load would (rightly) defer chunks for as long as it lasts (the budget has tests of its own)
    events = readme_block("# dags/configs/events.yaml") + "throttle:\n  max_latency_ratio: null\n"
    (dags / "configs" / "events.yaml").write_text(events)
    nopool = events.replace("name: events ", "name: events_nopool ").replace(
        "pool: backfill_source", f"pool: {MISSING_POOL}"
    )
    assert f"pool: {MISSING_POOL}" in nopool and "name: events_nopool" in nopool
    (dags / "configs" / "events_nopool.yaml").write_text(nopool)

    shots = Path(os.environ.get("E2E_ARTEFACTS") or tmp_path_factory.mktemp("first-hour-shots"))
    shots.mkdir(parents=True, exist_ok=True)
    cluster = AirflowCluster(
        dags,
        airflow_bin=venv / "bin" / "airflow",
        connections={"backfill_source_pg": src},  # README: `export AIRFLOW_CONN_BACKFILL_SOURCE_PG=...`
        # nothing of the checkout on the path: the components import what the wheel installed
        env={"PYTHONPATH": ""},
    )
    try:
        cluster.start()
        cluster.cli("connections", "add", "backfill_dest_pg", "--conn-uri", dst)  # README step 3, as written
        cluster.cli("pools", "set", "backfill_source", "4", "source slots for backfills", "--include-deferred")
        cluster.wait_for_dag(DAG)
        cluster.wait_for_dag(NOPOOL_DAG)
        cluster.unpause(DAG)  # `airflow backfill create` needs it (README)
        cluster.unpause(NOPOOL_DAG)
        yield Walk(cluster, src, dst, venv, shots, dags)
    finally:
        cluster.stop()
        print(f"first hour: wheel + venv {built:.1f} s, cluster start {cluster.timings.get('start_total', 0):.1f} s, "
              f"{time.monotonic() - t0:.0f} s in all; screenshots in {shots}; home {cluster.home}")  # fmt: skip


# ------------------------------------------------------------------------------------------ the walk
def test_the_components_run_the_built_wheel(walk):
    cluster = walk.cluster
    where = subprocess.run(
        [str(walk.venv / "bin" / "python"), "-c",
         "import json, importlib.metadata as m, airflow_backfill_provider as p; "
         "print(json.dumps([p.__file__, [str(d._path) for d in m.distributions() if d.name == 'airflow-backfill-provider']]))"],
        capture_output=True, text=True, env=cluster.env, cwd=cluster.home, check=True,
    )  # fmt: skip
    module, dists = json.loads(where.stdout.strip().splitlines()[-1])
    assert module.startswith(walk.site) and "site-packages" in module, module
    assert len(dists) == 1 and dists[0].startswith(walk.site), dists  # the wheel's metadata, once
    providers = {p["package_name"]: p for p in cluster.api("GET", "/providers")["providers"]}
    assert "airflow-backfill-provider" in providers  # its apache_airflow_provider entry point
    plugins = [p for p in cluster.api("GET", "/plugins")["plugins"] if p["name"] == "backfill_provider"]
    assert len(plugins) == 1 and [a["url_prefix"] for a in plugins[0]["fastapi_apps"]] == ["/backfill-progress"]
    assert "airflow-backfill-provider==" in str(plugins[0].get("source")), plugins[0]


def test_trigger_from_the_form_a_broken_day_fix_and_clear(walk, browser):  # noqa: F811
    cluster = walk.cluster
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(f"{cluster.base_url}/dags/{DAG}")
    page.get_by_role("button", name="Trigger").click()
    dialog = page.get_by_role("dialog")
    dialog.locator("#element_start").fill("2023-01-01")
    dialog.locator("#element_end").fill("2023-01-09")
    walk.shot(page, "first-hour-trigger-form.png")
    dialog.get_by_role("button", name="Trigger", exact=True).click()

    def the_run():
        runs = [r for r in cluster.dag_runs(DAG, "manual") if (r.get("conf") or {}).get("start") == "2023-01-01"]
        return runs[0]["dag_run_id"] if runs else None

    run_id = walk.form_run = cluster.wait_until("the run triggered from the form", the_run, 30)
    page.close()
    assert cluster.wait_for_run(DAG, run_id) == "failed"

    # the page: this run's figures and why the broken day failed
    p = walk.progress(DAG, run_id=run_id)
    assert (p["total"], p["counts"]["loaded"], p["counts"]["failed"]) == (8, 7, 1), p["counts"]
    assert p["rows_read"] == 7 * ROWS_PER_DAY and p["rows_inserted"] == 7 * ROWS_PER_DAY
    (failure,) = p["failures"]
    assert failure["chunks"] == [BROKEN_DAY.isoformat()]
    assert 'violates check constraint "amount_not_negative"' in failure["error"], failure
    context, page = walk.page(browser, f"/backfill-progress/dags/{DAG}?run_id={quote(run_id, safe='')}")
    assert page.locator(f'td[data-day="{BROKEN_DAY}"]').get_attribute("data-state") == "failed"
    assert page.locator("#done").inner_text() == "7/8 chunks done (88%)"
    assert "amount_not_negative" in page.locator("#failures").inner_text()
    walk.shot(page, "first-hour-failed-day.png")
    context.close()

    # fix the cause (refunds are allowed after all), clear the failed chunk: it loads, the run succeeds
    _sql(walk.dst, "ALTER TABLE public.events DROP CONSTRAINT amount_not_negative, "
         "ADD CONSTRAINT amount_sane CHECK (amount > -1000)")  # fmt: skip
    (index,) = [t.map_index for t in cluster.task_instances(DAG, run_id, "load_chunk") if t.state == "failed"]
    cluster.clear_failed(DAG, run_id, "load_chunk", map_index=index)
    assert cluster.wait_for_run(DAG, run_id) == "success"
    end = SEED_START + dt.timedelta(days=8)
    assert _digest(walk.dst, SEED_START, end) == _digest(walk.src, SEED_START, end)
    # the destination-only column was filled by its DEFAULT, not loaded as NULL
    assert _sql(walk.dst, "SELECT count(*) FILTER (WHERE loaded_at IS NULL), count(*) FROM public.events") == [
        (0, 8 * ROWS_PER_DAY)
    ]
    p = walk.progress(DAG, run_id=run_id)
    assert p["counts"]["loaded"] == 8 and p["failures"] == [] and (p["validation"] or {}).get("status") == "pass"


def test_backfill_create_and_the_whole_backfill_view(walk, browser):  # noqa: F811
    cluster = walk.cluster
    # 2023-01-08 was loaded by the form's run: its chunk is skipped as done, the three others load
    run_ids = cluster.backfill(DAG, "2023-01-08", "2023-01-11", max_active_runs=2)
    assert len(run_ids) == 4
    assert set(cluster.wait_for_runs(DAG, run_ids).values()) == {"success"}
    backfills = cluster.api("GET", "/backfills", params={"dag_id": DAG})["backfills"]
    (backfill,) = backfills
    p = walk.progress(DAG, backfill_id=str(backfill["id"]))
    assert [r["run_id"] for r in p["backfill"]["runs"]] == run_ids  # logical-date order
    assert (p["total"], p["done"], p["counts"]["skipped"]) == (4, 4, 1), p["counts"]
    end = SEED_START + dt.timedelta(days=11)
    assert _digest(walk.dst, SEED_START, end) == _digest(walk.src, SEED_START, end)

    context, page = walk.page(browser, f"/backfill-progress/dags/{DAG}?backfill_id={backfill['id']}")
    assert page.locator("#done").inner_text() == "4/4 chunks done (100%)"
    assert f"Backfill {backfill['id']}: 4 run(s)" in page.locator("#run").inner_text()
    assert page.locator("#validation").inner_text() == "No failing or warning day in this backfill's runs."
    walk.shot(page, "first-hour-whole-backfill.png")
    context.close()

    out = walk.status(DAG, "--backfill")  # the destination connection is in the metadata DB (connections add)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{DAG}  backfill {backfill['id']}: 4 run(s)" in out.stdout, out.stdout
    assert "chunks: 4/4 done (100%)" in out.stdout and "runs (logical date order):" in out.stdout
    listed = re.findall(r"^  (\S+)  (\S+)  \(success\)", out.stdout, flags=re.M)
    assert [r for _, r in listed] == run_ids, out.stdout


def test_a_missing_pool_is_named_with_the_fix(walk, browser):  # noqa: F811
    cluster = walk.cluster
    run_id = cluster.trigger(NOPOOL_DAG, {"start": "2023-01-12", "end": "2023-01-13"})

    def chunk_scheduled():
        return [t for t in cluster.task_instances(NOPOOL_DAG, run_id, "load_chunk") if t.state == "scheduled"]

    cluster.wait_until("the chunk waiting for its pool", chunk_scheduled, 90)
    fix = f'airflow pools set {MISSING_POOL} 4 "source slots for backfills" --include-deferred'
    p = walk.progress(NOPOOL_DAG, run_id=run_id)
    (problem,) = p["problems"]
    assert f"pool {MISSING_POOL!r}" in problem and fix in problem, problem
    assert p["eta"] == f"unknown (pool {MISSING_POOL!r} missing: 1 chunk(s) cannot start)"
    out = walk.status(NOPOOL_DAG, "--run-id", run_id)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"PROBLEM: The Airflow pool {MISSING_POOL!r}" in out.stdout and fix in out.stdout, out.stdout
    # Airflow 3: a task cannot read pools; the plan's log names the pool and the command (JSON lines: quotes escaped)
    plan_log = cluster.task_log(NOPOOL_DAG, run_id, "plan")
    assert f"airflow pools set {MISSING_POOL} 4 " in plan_log, plan_log[-2000:]

    context, page = walk.page(browser, f"/backfill-progress/dags/{NOPOOL_DAG}?run_id={quote(run_id, safe='')}")
    assert fix in page.locator("#problems").inner_text()
    walk.shot(page, "first-hour-missing-pool.png")
    context.close()

    # do what it says
    cluster.cli(*shlex.split(fix)[1:])
    assert cluster.wait_for_run(NOPOOL_DAG, run_id) == "success"
    assert walk.progress(NOPOOL_DAG, run_id=run_id)["problems"] == []


def test_a_broken_spec_is_an_import_error_and_the_others_still_load(walk, browser):  # noqa: F811
    cluster = walk.cluster
    typo = (walk.dags / "configs" / "events.yaml").read_text().replace("name: events ", "name: events_typo ")
    (walk.dags / "configs" / "typo.yaml").write_text(typo.replace("granularity: day", "granularity: daily"))
    written = dt.datetime.now(dt.UTC)

    def import_errors():
        return cluster.api("GET", "/importErrors")["import_errors"]

    (error,) = cluster.wait_until("the broken spec's import error", import_errors, 90)
    assert Path(error["filename"]).name == "backfill_config_check.py"
    assert "typo.yaml" in error["stack_trace"] and "granularity: 'daily' is not valid" in error["stack_trace"]
    assert walk.site in error["stack_trace"]  # the dag-processor ran the wheel's configcheck.py

    out = cluster.cli("dags", "list-import-errors", "-o", "json", check=False)
    assert out.returncode == 1, out.stderr[-2000:]  # usable in CI
    listed = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("[")))
    assert [Path(e["filepath"]).name for e in listed] == ["backfill_config_check.py"]

    def good_dags_parsed_again():
        dags = {d: cluster.api("GET", f"/dags/{d}") for d in (DAG, NOPOOL_DAG)}
        fresh = all(dt.datetime.fromisoformat(d["last_parsed_time"]) > written for d in dags.values())
        return dags if fresh else None

    for dag in cluster.wait_until("the good specs parsed after the typo", good_dags_parsed_again, 90).values():
        assert dag["is_stale"] is False and dag["has_import_errors"] is False
    assert cluster.api("GET", "/dags/backfill_events_typo", expect=(404,)) is not None

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(f"{cluster.base_url}/")  # the home page counts them: "1 Dag Import Error", opening the list
    page.get_by_text(re.compile(r"Dag Import Errors?")).first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("backfill_config_check.py").first.wait_for()
    reason = dialog.get_by_text("granularity: 'daily' is not valid").first
    if not reason.is_visible():  # the file's entry is folded: open it
        dialog.get_by_text("backfill_config_check.py").first.click()
    reason.wait_for()
    walk.shot(page, "first-hour-import-error.png")
    page.close()
