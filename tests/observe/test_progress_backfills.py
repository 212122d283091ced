"""Two backfills into one table: the progress figures are each backfill's own (issue 16), and the per-chunk
waits the page shows come from the ledger (including a ledger from before the wait columns).

Real loads on PostgreSQL: two source tables (two backfills by prepare/identity.py) into one destination table,
run by two DAGs whose runs have the same run id (``airflow backfill create`` names runs by date alone).
"""

from __future__ import annotations

import datetime as dt

from airflow_backfill_provider.ledger import table as ledger
from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.plan.planning import build_plan
from airflow_backfill_provider.observe.progress import (
    RunInfo,
    TaskState,
    build_progress,
    ledger_rate,
    read_ledger,
    run_totals,
)
from airflow_backfill_provider.core.spec import TableName
from airflow_backfill_provider.transfer.chunk import RunInfo as Run
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all
from tests.seed import create_orders, seed_orders
from tests.specs import make_spec

DAYS = plan_chunks("2024-01-01", "2024-01-04", "day", "UTC")
RUN_ID = "backfill__2024-01-01T00:00:00+00:00"  # both DAGs' runs: ids are unique per DAG only


def rows_per_day(src_url, table):
    got = fetch_all(src_url, f"SELECT created_at::date::text, count(*) FROM {table} GROUP BY 1 ORDER BY 1")
    return dict(got)


def test_two_backfills_into_one_table_each_show_their_own_progress(src_url, dst_url, pg):
    src = pg(src_url)
    seed_orders(src, rows=300, days=3, start=dt.date(2024, 1, 1), table="orders_us", first_id=1)
    seed_orders(src, rows=90, days=3, start=dt.date(2024, 1, 1), table="orders_eu", first_id=10_001)
    create_orders(pg(dst_url))
    us = make_spec(src_url, dst_url, name="us", source_table="orders_us")
    eu = make_spec(src_url, dst_url, name="eu", source_table="orders_eu")
    keys = {}
    for spec in (us, eu):  # the plan records the backfill's key (what the page selects the ledger by)
        plan = build_plan(spec, "2024-01-01", "2024-01-04", dst_conn=pg(dst_url), src_conn=pg(src_url))
        keys[spec.name] = plan.summary()["backfill_key"]
    assert keys["us"] and keys["eu"] and keys["us"] != keys["eu"]

    for c in DAYS:  # us: every day, its second one after waiting 4 s for the source's load
        transfer_chunk(us, c, run=Run("backfill_us", RUN_ID, waited_load_s=4.0 if c is DAYS[1] else 0.0))
    for c in DAYS[:2]:  # eu: two of three days so far; the first waited 1.5 s for its pacing turn
        transfer_chunk(eu, c, run=Run("backfill_eu", RUN_ID, waited_pacing_s=1.5 if c is DAYS[0] else 0.0))
    # the same plan again: each backfill skips its own loaded days only
    plan = build_plan(eu, "2024-01-01", "2024-01-04", dst_conn=pg(dst_url), src_conn=pg(src_url))
    assert ([c.chunk_id for c in plan.chunks], plan.backfill_key) == ([DAYS[2].chunk_id], keys["eu"])

    eu_days = rows_per_day(src_url, "orders_eu")
    conn = pg(dst_url)
    rows = read_ledger(conn, eu, backfill_key=keys["eu"])
    assert sorted((r.chunk_id, r.rows) for r in rows) == [(c.chunk_id, eu_days[c.chunk_id]) for c in DAYS[:2]]
    assert read_ledger(conn, eu, dag_id="backfill_eu") == rows  # before its plan ran: by the DAG
    assert len(read_ledger(conn, us, backfill_key=keys["us"])) == 3

    run = RunInfo(run_id=RUN_ID, state="running", start=DAYS[0].start, end=DAYS[-1].end, granularity="day",
                  started_at=DAYS[0].start, backfill_key=keys["eu"])  # fmt: skip
    tis = [TaskState(c.chunk_id, "success") for c in DAYS[:2]] + [TaskState(DAYS[2].chunk_id, None)]
    p = build_progress(eu, dag_id="backfill_eu", run=run, ledger_rows=rows, task_states=tis, validation=None,
                       now=DAYS[0].start + dt.timedelta(seconds=60))  # fmt: skip
    assert (p.counts["loaded"], p.counts["pending"], p.total) == (2, 1, 3)
    assert p.rows_loaded == eu_days[DAYS[0].chunk_id] + eu_days[DAYS[1].chunk_id]  # not the us rows of those days
    assert [c.rows for c in p.chunks] == [eu_days[DAYS[0].chunk_id], eu_days[DAYS[1].chunk_id], None]
    assert p.waits == {"load_s": 0.0, "pacing_s": 1.5, "chunks_waited": 1, "deferred_now": 0}  # us waited 4 s

    # the chunk log line's totals: this DAG's run only, though the other DAG's run has the same id
    assert run_totals(conn, eu, RUN_ID) == (2, p.rows_loaded)
    assert run_totals(conn, us, RUN_ID) == (3, 300)
    assert ledger_rate(conn, eu, keys["eu"]) == p.rows_loaded / sum(r.seconds for r in rows)


def test_a_ledger_from_before_the_wait_columns_still_counts_and_is_migrated(src_url, dst_url, pg):
    src = pg(src_url)
    seed_orders(src, rows=30, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    spec = make_spec(src_url, dst_url)
    transfer_chunk(spec, DAYS[0], run=Run(run_id="r1"))
    conn = pg(dst_url)
    with conn.cursor() as cur:  # the previous release's ledger: keyed, no wait columns
        cur.execute("ALTER TABLE backfill_ledger DROP COLUMN waited_load_s, DROP COLUMN waited_pacing_s")
    table = TableName.parse(spec.ledger_table)
    assert ledger.is_current(conn, table)  # its rows still count as done: the keys are this release's
    plan = build_plan(spec, "2024-01-01", "2024-01-04", dst_conn=conn, src_conn=pg(src_url))
    assert [c.chunk_id for c in plan.skipped] == [DAYS[0].chunk_id]
    (old,) = read_ledger(conn, spec, backfill_key=plan.backfill_key)
    assert (old.chunk_id, old.rows, old.waited_load_s, old.waited_pacing_s) == (DAYS[0].chunk_id, 10, None, None)

    transfer_chunk(
        spec, DAYS[1], run=Run(run_id="r2", waited_load_s=2.0, waited_pacing_s=0.5)
    )  # the next chunk migrates
    got = sorted(
        (r.chunk_id, r.waited_load_s, r.waited_pacing_s) for r in read_ledger(conn, spec, dag_id="backfill_orders")
    )
    assert got == [(DAYS[0].chunk_id, None, None), (DAYS[1].chunk_id, 2.0, 0.5)]


# ------------------------------------------------------------------ the whole backfill (issue 24 item 7)
BACKFILL_DAYS = plan_chunks("2024-02-01", "2024-02-05", "day", "UTC")  # one run per day, as `backfill create`


def _backfill_inputs(spec, dst_url, pg, src_url):
    """Four daily runs of one backfill: the 1st and 4th loaded their day for real, the 2nd's is pending, the 3rd's
    failed."""
    from airflow_backfill_provider.observe.progress import ChunkFailure, RunInputs

    seed_orders(pg(src_url), rows=400, days=4, start=dt.date(2024, 2, 1))
    create_orders(pg(dst_url))
    ids = [f"backfill__{c.start.isoformat()}" for c in BACKFILL_DAYS]
    for i in (0, 3):
        transfer_chunk(spec, BACKFILL_DAYS[i], run=Run("backfill_orders", ids[i]))
    key = build_plan(spec, "2024-02-01", "2024-02-05", dst_conn=pg(dst_url), src_conn=pg(src_url)).backfill_key
    states = ("success", "running", "failed", "success")
    inputs = [
        RunInputs(
            run=RunInfo(run_id=ids[i], state=states[i], start=c.start, end=c.end, granularity="day",
                        started_at=c.start, backfill_key=key),
            logical_date=c.start,
            task_states=[TaskState(c.chunk_id, {0: "success", 1: None, 2: "failed", 3: "success"}[i])],
            failures=[ChunkFailure(c.chunk_id, "permanent error (SQLSTATE P0001): injected")] if i == 2 else [],
        )
        for i, c in enumerate(BACKFILL_DAYS)
    ]  # fmt: skip
    return ids, key, inputs


def test_a_whole_backfill_adds_up_its_runs_chunks_in_logical_date_order(src_url, dst_url, pg):
    from airflow_backfill_provider.observe.progress import build_backfill, format_text

    spec = make_spec(src_url, dst_url)
    ids, key, inputs = _backfill_inputs(spec, dst_url, pg, src_url)
    rows = read_ledger(pg(dst_url), spec, backfill_key=key)
    jumbled = [inputs[2], inputs[0], inputs[3], inputs[1]]  # the order runs started in
    p = build_backfill(spec, dag_id="backfill_orders", backfill_id="7", runs=jumbled, ledger_rows=rows)
    per_day = rows_per_day(src_url, "orders")
    assert [r.run_id for r in p.backfill.runs] == ids  # logical-date order
    assert [(r.done, r.total, r.failed) for r in p.backfill.runs] == [(1, 1, 0), (0, 1, 0), (0, 1, 1), (1, 1, 0)]
    assert (p.done, p.total, p.counts["failed"], p.counts["pending"]) == (2, 4, 1, 1)
    assert [(d.day.isoformat(), d.state) for d in p.days] == [
        ("2024-02-01", "loaded"),
        ("2024-02-02", "pending"),
        ("2024-02-03", "failed"),
        ("2024-02-04", "loaded"),
    ]  # fmt: skip  (one calendar for every run's chunks)
    assert p.rows_loaded == per_day["2024-02-01"] + per_day["2024-02-04"]
    assert p.failures == [("permanent error (SQLSTATE P0001): injected", 1, ["2024-02-03"])]
    assert p.backfill.state == "running" and p.eta_s is not None  # one chunk left, a rate from two
    text = format_text(p)
    assert text.splitlines()[0] == "backfill_orders  backfill 7: 4 run(s)  (running)"
    assert "chunks: 2/4 done (50%)" in text and f"rows: {p.rows_loaded:,} read by this backfill's runs" in text
    assert "\n  1 x permanent error (SQLSTATE P0001): injected  [2024-02-03]\n" in text
    listed = [line.split()[1] for line in text.split("runs (logical date order):\n")[1].splitlines()[:4]]
    assert listed == ids
    assert p.to_dict()["backfill"]["runs"][2] == {"run_id": ids[2], "logical_date": BACKFILL_DAYS[2].start.isoformat(),
                                                  "state": "failed", "total": 1, "done": 0, "failed": 1}  # fmt: skip


def test_the_page_shows_the_backfills_runs_in_order_and_a_fixed_width_calendar(src_url, dst_url, pg):
    import pytest

    pytest.importorskip("fastapi")
    from airflow_backfill_provider.observe.progress import build_backfill
    from airflow_backfill_provider.ui.app import CSS, _page, render

    spec = make_spec(src_url, dst_url)
    ids, key, inputs = _backfill_inputs(spec, dst_url, pg, src_url)
    rows = read_ledger(pg(dst_url), spec, backfill_key=key)
    p = build_backfill(spec, dag_id="backfill_orders", backfill_id="7", runs=inputs[::-1], ledger_rows=rows)
    body = render(p, [])
    table = body[body.index("id='backfill-runs'") :].split("</table>")[0]
    assert [table.index(f'data-run="{i}"') for i in ids] == sorted(table.index(f'data-run="{i}"') for i in ids)
    assert '<p id="run"><b>Backfill 7</b>: 4 run(s) (running), [2024-02-01, 2024-02-05), day</p>' in body
    assert '<span class="big" id="done">2/4 chunks done (50%)</span>' in body
    # no run's validation found a day off: said as `status --backfill` says it, not "not run yet for this run"
    assert '<p id="validation">No failing or warning day in this backfill\'s runs.</p>' in body
    # the calendar: a header cell per day number, every cell fixed width; a legend; styled, no external asset
    assert "<th class='d'>1</th><th class='d'>2</th>" in body and "<th class='d'>31</th>" in body
    assert "table-layout:fixed" in CSS and "width:18px" in CSS and 'id="counts"' in body
    page = _page("t", body)
    assert "<style>" in page and "http" not in page.split("<body>")[0] and "<link" not in page


def test_status_finds_the_latest_runs_backfill_in_the_metadata_db(airflow_db, src_url, dst_url, pg, capsys):
    """Real metadata rows: one backfill's daily runs (Airflow 3: a Backfill and its runs' backfill_id; 2.11:
    backfill-type runs) started in jumbled order; ``status`` prints the whole backfill, runs by logical date."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    from airflow_backfill_provider.observe import airflow_state
    from airflow_backfill_provider.core.compat import AIRFLOW_V_3

    dag_id = "backfill_whole_view"
    spec = make_spec(src_url, dst_url, name="whole_view", dag_id=dag_id)
    assert spec.effective_dag_id == dag_id
    seed_orders(pg(src_url), rows=400, days=4, start=dt.date(2024, 2, 1))
    create_orders(pg(dst_url))
    ids = [f"backfill__{c.start.isoformat()}" for c in BACKFILL_DAYS]
    with create_session() as session:
        backfill_id = None
        if AIRFLOW_V_3:
            from airflow.models.backfill import Backfill

            bf = Backfill(dag_id=dag_id, from_date=BACKFILL_DAYS[0].start, to_date=BACKFILL_DAYS[-1].start,
                          dag_run_conf={})  # fmt: skip
            session.add(bf)
            session.flush()
            backfill_id = bf.id
        for n, i in enumerate((2, 0, 3, 1)):  # started in this order
            c = BACKFILL_DAYS[i]
            kw = {"logical_date": c.start, "run_after": c.end, "backfill_id": backfill_id} if AIRFLOW_V_3 else {
                "execution_date": c.start}  # fmt: skip
            session.add(DagRun(dag_id=dag_id, run_id=ids[i], run_type="backfill", data_interval=(c.start, c.end),
                               state=DagRunState.SUCCESS if i in (0, 3) else DagRunState.RUNNING,
                               start_date=c.end + dt.timedelta(minutes=n), **kw))  # fmt: skip
    for i in (0, 3):
        transfer_chunk(spec, BACKFILL_DAYS[i], run=Run(dag_id, ids[i]))

    listed = airflow_state.backfill_runs(dag_id, airflow_state.latest_backfill(dag_id))
    assert [r["run_id"] for r in listed] == ids
    p = airflow_state.collect_view(dag_id, spec=spec)  # automatic: the latest run is in a backfill
    assert p.backfill is not None and [r.run_id for r in p.backfill.runs] == ids
    assert (p.done, p.total) == (2, 4)
    run_only = airflow_state.collect_view(dag_id, ids[1], spec=spec, whole=False)
    assert run_only.backfill is None and run_only.total == 1
