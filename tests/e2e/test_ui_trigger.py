"""Browser test of the trigger form on Airflow 3: headless Chromium (Debian's package) via Playwright.

Opens the orders DAG, fills start/end in the trigger form, submits, and the run loads exactly that range.
A bad date is refused: the date picker will not take it, and typed into the form's JSON it is rejected by the
params' ``format: date`` validation with the message shown in the form, and no run is created.

Needs ``pip install playwright`` (its wheel ships the driver) and ``apt-get install chromium``; Playwright's
own browser download is not used. Skipped when either is missing, except under CI (env CI set), where a
missing install must fail rather than hide.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil

import pytest

from tests.e2e.cluster import airflow_major
from tests.e2e.orders_env import DAG_ID
from tests.e2e.scenarios import assert_loaded_exactly_once

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(airflow_major() < 3, reason="the browser test drives the Airflow 3 UI"),
]

CHROMIUM = os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _missing(what: str):
    message = f"{what}: install it (pip install playwright; apt-get install -y chromium) to run the browser test"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    if not shutil.which(CHROMIUM):
        _missing(f"no Chromium at {CHROMIUM} (set E2E_CHROMIUM)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def cluster(orders_cluster):
    return orders_cluster


@pytest.fixture()
def trigger_form(browser, cluster):
    """The orders DAG's trigger dialog, open (SimpleAuthManager all-admins: no login page)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.set_default_timeout(30_000)
    page.goto(f"{cluster.base_url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger").click()
    dialog = page.get_by_role("dialog")
    dialog.locator("#element_start").wait_for()
    yield page, dialog
    page.close()


def manual_runs_with(cluster, start: str) -> list[dict]:
    return [r for r in cluster.dag_runs(DAG_ID, "manual") if (r.get("conf") or {}).get("start") == start]


def test_trigger_form_runs_the_range(cluster, orders, trigger_form):
    page, dialog = trigger_form
    dialog.locator("#element_start").fill("2023-03-06")
    dialog.locator("#element_end").fill("2023-03-09")
    dialog.get_by_role("button", name="Trigger", exact=True).click()

    runs = cluster.wait_until("the run triggered from the form", lambda: manual_runs_with(cluster, "2023-03-06"), 30)
    assert len(runs) == 1 and runs[0]["conf"]["end"] == "2023-03-09"
    assert cluster.wait_for_run(DAG_ID, runs[0]["dag_run_id"]) == "success"
    labels = [t.label for t in cluster.task_instances(DAG_ID, runs[0]["dag_run_id"], "load_chunk")]
    assert labels == ["2023-03-06", "2023-03-07", "2023-03-08"]
    assert_loaded_exactly_once(orders, dt.date(2023, 3, 6), dt.date(2023, 3, 9))


def test_bad_date_is_refused_by_the_form(cluster, trigger_form):
    page, dialog = trigger_form
    start = dialog.locator("#element_start")
    # The date picker does not take an impossible date: the field stays empty.
    start.click()
    page.keyboard.type("02302023")
    assert start.input_value() == ""

    # Typed into the form's JSON, the params' format check refuses it and the form says why.
    dialog.get_by_role("button", name="Advanced Options").click()
    editor = dialog.locator(".monaco-editor .view-lines")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text('{"start": "2023-02-30", "end": "2023-03-02"}')
    dialog.get_by_role("button", name="Trigger", exact=True).click()

    error = dialog.get_by_text("is not a 'date'")
    error.wait_for()
    assert "2023-02-30" in error.inner_text()
    assert manual_runs_with(cluster, "2023-02-30") == []
