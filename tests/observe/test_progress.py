"""The progress read model: chunk states, calendar days, ETA, and ledger/validation reads on real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import html
import importlib.util

import pendulum
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_backfill_provider.ledger import table as ledger
from airflow_backfill_provider.observe.progress import (
    NO_REASON,
    STATES,
    ChunkFailure,
    LedgerRow,
    RunInfo,
    TaskState,
    build_progress,
    format_text,
    read_ledger,
    read_validation,
)
from airflow_backfill_provider.core.spec import TableName
from tests.specs import make_spec

UTC = dt.timezone.utc


def day(i: int) -> dt.datetime:
    return dt.datetime(2024, 1, 1, tzinfo=UTC) + dt.timedelta(days=i)


def run(n_days: int, run_id: str = "r1", **kw) -> RunInfo:
    return RunInfo(run_id=run_id, state="running", start=day(0), end=day(n_days), granularity="day", **kw)


def lrow(i: int, rows: int = 100, seconds: float = 1.0, run_id: str = "r1") -> LedgerRow:
    return LedgerRow(f"2024-01-{i + 1:02d}", day(i), day(i + 1), rows, seconds, run_id, day(40))


# (task-instance state, ledger row written by: this run / an earlier run / none) -> chunk state
STATE_MATRIX = [
    ("success", "this", "loaded"),
    ("success", None, "loaded"),
    ("failed", None, "failed"),
    ("upstream_failed", None, "failed"),
    ("running", None, "running"),
    ("queued", None, "running"),
    ("scheduled", None, "pending"),
    ("up_for_retry", None, "running"),
    ("deferred", None, "deferred"),
    (None, None, "pending"),
    ("<no ti>", None, "pending"),
    ("<no ti>", "earlier", "skipped"),
    ("<no ti>", "this", "loaded"),
]


@pytest.mark.parametrize("ti_state,ledger_by,expected", STATE_MATRIX)
def test_chunk_state_matrix(ti_state, ledger_by, expected):
    rows = [] if ledger_by is None else [lrow(0, run_id="r1" if ledger_by == "this" else "r0")]
    tis = [] if ti_state == "<no ti>" else [TaskState("2024-01-01", ti_state)]
    p = build_progress(make_spec(), dag_id="d", run=run(1), ledger_rows=rows, task_states=tis, validation=None)
    assert [c.state for c in p.chunks] == [expected]
    assert p.counts[expected] == 1 and sum(p.counts.values()) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["success", "failed", "running", "deferred", None, "<skip>"]), min_size=1, max_size=40))
def test_counts_and_calendar_cells_match_the_chunks(states):
    """Hour chunks: each day's cell shows its most telling chunk; counts add up to the plan."""
    spec = make_spec(granularity="hour")
    hours = len(states)
    info = RunInfo("r1", "running", day(0), day(0) + dt.timedelta(hours=hours), "hour")
    tis, rows = [], []
    for h, s in enumerate(states):
        start = day(0) + dt.timedelta(hours=h)
        cid = pendulum.instance(start).format("YYYY-MM-DDTHH:mmZ")
        if s == "<skip>":
            rows.append(LedgerRow(cid, start, start + dt.timedelta(hours=1), 10, 0.1, "r0", day(1)))
        else:
            tis.append(TaskState(cid, s))
    p = build_progress(spec, dag_id="d", run=info, ledger_rows=rows, task_states=tis, validation=None)
    assert p.total == hours and sum(p.counts.values()) == hours
    assert [c.chunk_id for c in p.chunks] == sorted(c.chunk_id for c in p.chunks)
    for cell in p.days:
        of_day = [c.state for c in p.chunks if c.start.date() == cell.day]
        assert cell.state == min(of_day, key=STATES.index)
        assert cell.chunks == len(of_day)


def test_rate_is_over_the_window_chunks_loaded_in_not_since_the_run_started():
    """4 chunks of 100 rows, 1 s each: two in parallel at t=0, one at t=10 s, one at t=10.5 s (a clear and a
    retry between): loaded during [0, 1] + [10, 11.5] = 2.5 s -> 160 rows/s. The run's (clear-reset) start date
    plays no part; 5 x 100 rows left (the failed chunk is not work left) -> 3.1 s."""
    t0 = day(50)
    at = [0.0, 0.0, 10.0, 10.5]
    rows = [LedgerRow(f"2024-01-{i + 1:02d}", day(i), day(i + 1), 100, 1.0, "r1", t0 + dt.timedelta(seconds=s),
                      inserted=60, updated=10) for i, s in enumerate(at)]  # fmt: skip
    tis = [TaskState(f"2024-01-{i + 1:02d}", "success") for i in range(4)]
    tis += [TaskState("2024-01-05", "running"), TaskState("2024-01-06", "failed")]
    clear_reset = t0 + dt.timedelta(seconds=10.4)  # the run's start date after a clear: 1.1 s before "now"
    p = build_progress(make_spec(), dag_id="d", run=run(10, started_at=clear_reset), ledger_rows=rows,
                       task_states=tis, validation=None, now=clear_reset + dt.timedelta(seconds=1.1))  # fmt: skip
    assert p.counts == {"failed": 1, "running": 1, "deferred": 0, "pending": 4, "loaded": 4, "skipped": 0}
    assert p.load_s == pytest.approx(2.5) and p.rate_rows_s == pytest.approx(160.0)
    assert p.eta_s == pytest.approx(5 * 100 / 160.0)
    assert (p.rows_loaded, p.rows_written, p.rows_inserted, p.rows_updated) == (400, 280, 240, 40)
    text = format_text(p)
    assert "rows: 400 read by this run, 280 written (240 inserted, 40 updated, 120 unchanged)" in text
    assert "rate 160 rows/s read over 2.5 s of loading" in text
    assert "ETA: 3 s" in text and "failed chunks: 2024-01-06" in text and "4/10 done (40%)" in text


def test_a_rerun_that_changed_nothing_reads_rows_and_writes_none():
    rows = [LedgerRow("2024-01-01", day(0), day(1), 215_400, 2.0, "r1", day(50), inserted=0, updated=0)]
    p = build_progress(make_spec(), dag_id="d", run=run(1), ledger_rows=rows,
                       task_states=[TaskState("2024-01-01", "success")], validation=None)  # fmt: skip
    assert "rows: 215,400 read by this run, 0 written (0 inserted, 0 updated, 215,400 unchanged)" in format_text(p)
    assert p.to_dict()["rows_written"] == 0 and p.to_dict()["rows_read"] == 215_400


def test_an_earlier_runs_figures_are_not_this_runs():
    """A chunk this run has not loaded (failed, running, pending) whose ledger row an earlier run wrote: no rows
    or rows/s of this run; the earlier run's rows are kept apart, named by its run id."""
    earlier = LedgerRow("2024-01-01", day(0), day(1), 2_220, 0.054, "r0", day(40), inserted=2_220, updated=0)
    for ti_state in ("failed", "running", "scheduled"):
        p = build_progress(make_spec(), dag_id="d", run=run(1), ledger_rows=[earlier],
                           task_states=[TaskState("2024-01-01", ti_state)], validation=None)  # fmt: skip
        (c,) = p.chunks
        assert (c.rows, c.seconds, c.rows_per_s, c.inserted) == (None, None, None, None)
        assert (c.earlier_run_id, c.earlier_rows) == ("r0", 2_220)
        assert p.rows_loaded == 0 and p.rate_rows_s is None and p.rows_done == 0
    # skipped as done by the earlier run: counted as done in range, shown as the earlier run's
    p = build_progress(make_spec(), dag_id="d", run=run(1), ledger_rows=[earlier], task_states=[], validation=None)
    assert p.chunks[0].state == "skipped" and p.rows_done == 2_220 and p.rows_loaded == 0
    assert p.days[0].rows == 2_220


def test_failures_are_grouped_by_their_first_line_with_counts():
    tis = [TaskState(f"2024-01-{i + 1:02d}", "failed") for i in range(5)] + [TaskState("2024-01-06", "success")]
    errors = [ChunkFailure("2024-01-01", 'relation "public.orders" does not exist'),
              ChunkFailure("2024-01-02", "source too busy"),
              ChunkFailure("2024-01-03", 'relation "public.orders" does not exist'),
              ChunkFailure("2024-01-06", "an earlier try's error: this chunk loaded since")]  # fmt: skip
    p = build_progress(make_spec(), dag_id="d", run=run(6), ledger_rows=[lrow(5)], task_states=tis,
                       validation=None, failures=errors)  # fmt: skip
    assert p.failures == [
        ('relation "public.orders" does not exist', 2, ["2024-01-01", "2024-01-03"]),
        (NO_REASON, 2, ["2024-01-04", "2024-01-05"]),
        ("source too busy", 1, ["2024-01-02"]),
    ]
    assert {c.chunk_id: c.error for c in p.chunks}["2024-01-06"] is None  # loaded: its old error is history
    text = format_text(p)
    assert '  2 x relation "public.orders" does not exist  [2024-01-01, 2024-01-03]' in text


def test_finished_run_with_failures_has_no_eta_but_says_why():
    tis = [TaskState("2024-01-01", "success"), TaskState("2024-01-02", "failed")]
    p = build_progress(make_spec(), dag_id="d", run=run(2, started_at=day(50)), ledger_rows=[lrow(0)],
                       task_states=tis, validation=None, now=day(51))  # fmt: skip
    assert p.eta_s is None and p.eta_note == "1 failed chunk(s) to clear"


def test_reads_ledger_and_validation_from_real_postgres(dst_url, pg):
    """The ledger as chunks write it and the validation summary as validation stores it, read back."""
    from airflow_backfill_provider.prepare.identity import BackfillIdentity
    from airflow_backfill_provider.validate import FAIL, PASS, WARN, DayResult, ValidationReport, store_summary

    spec = make_spec(destination_conn_id=dst_url)
    conn = pg(dst_url)
    conn.autocommit = False
    assert read_ledger(conn, spec, dag_id="d") == [] and read_validation(conn, spec, dag_id="d", run_id=None) is None
    ledger.ensure_table(conn, TableName.parse(spec.ledger_table))
    with conn.cursor() as cur:
        for i in range(3):
            ledger.record(
                cur,
                TableName.parse(spec.ledger_table),
                backfill=BackfillIdentity("public.orders", "k", {}),
                chunk_id=f"2024-01-{i + 1:02d}",
                start=day(i),
                end=day(i + 1),
                dag_id="d",
                run_id="r1",
                stats={"extracted": 100 + i, "inserted": 100 + i, "updated": 0, "unchanged": 0, "seconds": 0.5},
                waited_load_s=2.5 if i == 1 else 0.0,
                waited_pacing_s=1.0 if i == 2 else 0.0,
            )
        ledger.record(  # another table's row must not show up
            cur,
            TableName.parse(spec.ledger_table),
            backfill=BackfillIdentity("public.other", "k", {}),
            chunk_id="x",
            start=day(0),
            end=day(1),
            dag_id="o",
            run_id="r9",
            stats={"extracted": 5, "inserted": 5, "updated": 0, "unchanged": 0, "seconds": 0.5},
        )
    conn.commit()
    rows = read_ledger(conn, spec, backfill_key="k")
    assert sorted((r.chunk_id, r.rows, r.run_id, r.waited_load_s, r.waited_pacing_s) for r in rows) == [
        ("2024-01-01", 100, "r1", 0.0, 0.0), ("2024-01-02", 101, "r1", 2.5, 0.0), ("2024-01-03", 102, "r1", 0.0, 1.0),
    ]  # fmt: skip
    assert read_ledger(conn, spec, dag_id="d") == rows and read_ledger(conn, spec, backfill_key="other") == []

    days = [
        DayResult(dt.date(2024, 1, 1), 100, 100, {}, {"rows": 0.0}, PASS),
        DayResult(dt.date(2024, 1, 2), 100, 90, {}, {"rows": 0.10}, FAIL),
        DayResult(dt.date(2024, 1, 3), 100, 99, {}, {"rows": 0.01}, WARN),
        DayResult(dt.date(2024, 1, 4), 100, 50, {}, {"rows": 0.50}, FAIL),
    ]
    report = ValidationReport("public.orders", "UTC", pendulum.instance(day(0)), pendulum.instance(day(4)),
                              0.001, 0.05, [], days)  # fmt: skip
    store_summary(conn, TableName.parse(spec.validation.report_table), report, dag_id="d", run_id="r1")
    v = read_validation(conn, spec, dag_id="d", run_id="r1")
    assert v["status"] == FAIL and v["days_fail"] == 2
    assert read_validation(conn, spec, dag_id="d", run_id="other") is None

    tis = [TaskState(f"2024-01-{i + 1:02d}", "success") for i in range(3)] + [TaskState("2024-01-04", "failed")]
    p = build_progress(spec, dag_id="d", run=run(4), ledger_rows=rows, task_states=tis, validation=v)
    assert [d["day"] for d in p.worst_days] == ["2024-01-04", "2024-01-02", "2024-01-03"]  # worst first
    assert {c.day.isoformat(): c.validation for c in p.days} == {
        "2024-01-01": None, "2024-01-02": "fail", "2024-01-03": "warn", "2024-01-04": "fail",
    }  # fmt: skip
    text = format_text(p)
    assert text.index("2024-01-04  FAIL") < text.index("2024-01-02  FAIL") < text.index("2024-01-03  WARN")
    assert "waits: 2.5 s for the source's load, 1.0 s for pacing (2 loaded chunk(s) waited)" in text
    payload = p.to_dict()
    assert payload["days"][3] == ["2024-01-04", "failed", 1, 0, "fail"]
    assert payload["chunks"]["rows"][0][:5] == ["2024-01-01", "2024-01-01T00:00:00+00:00", "loaded", "success", 100]
    cols = payload["chunks"]["columns"]
    assert [payload["chunks"]["rows"][1][cols.index(k)] for k in ("waited_load_s", "waited_pacing_s")] == [2.5, 0.0]
    assert payload["waits"] == {"load_s": 2.5, "pacing_s": 1.0, "chunks_waited": 2, "deferred_now": 0}


@pytest.mark.heavy
@pytest.mark.parametrize("from_descriptors", [False, True])
def test_twenty_thousand_hour_chunks_build_in_one_pass(from_descriptors):
    """A 20k-chunk plan (hours over 2.3 years) with a ledger row and a task state per chunk.

    The same result from the planner's cut (before the plan task ran) and from the plan's descriptors plus
    the ledger rows it skipped (after), where every 7th chunk was done by an earlier run.
    """
    spec = make_spec(granularity="hour")
    n = 20_000
    t0 = pendulum.datetime(2022, 1, 1, tz="UTC")
    rows, tis = [], []
    descriptors = []
    for h in range(n):
        start = t0.add(hours=h)
        cid = start.format("YYYY-MM-DDTHH:mmZ")
        if h % 7 == 0:
            rows.append(LedgerRow(cid, start, start.add(hours=1), 10, 0.1, "r0", t0))
            continue
        descriptors.append({"chunk_id": cid, "start": start.isoformat(), "end": start.add(hours=1).isoformat()})
        if h % 2:
            rows.append(LedgerRow(cid, start, start.add(hours=1), 10, 0.1, "r1", t0))
            tis.append(TaskState(cid, "success"))
        else:
            tis.append(TaskState(cid, "failed" if h % 1000 == 0 else "running"))
    info = RunInfo("r1", "running", t0, t0.add(hours=n), "hour", started_at=t0,
                   descriptors=descriptors if from_descriptors else None)  # fmt: skip
    p = build_progress(spec, dag_id="d", run=info, ledger_rows=rows, task_states=tis, validation=None,
                       now=t0.add(hours=1))  # fmt: skip
    skipped = len(range(0, n, 7))
    loaded = sum(1 for h in range(n) if h % 7 and h % 2)
    failed = sum(1 for h in range(n) if h % 7 and not h % 2 and h % 1000 == 0)
    assert p.total == n and p.counts["skipped"] == skipped
    assert p.counts["loaded"] == loaded and p.counts["failed"] == failed > 0
    assert [c.chunk_id for c in p.chunks] == [t0.add(hours=h).format("YYYY-MM-DDTHH:mmZ") for h in range(n)]
    assert len(p.days) == n // 24 + 1
    first_failed = t0.add(hours=next(h for h in range(n) if h % 7 and h % 1000 == 0)).date()
    assert next(d for d in p.days if d.day == first_failed).state == "failed"


def test_page_shows_waits_per_chunk_and_in_total():
    pytest.importorskip("fastapi")  # the page is Airflow 3's (its API server is FastAPI)
    from airflow_backfill_provider.ui.app import render

    rows = [
        LedgerRow("2024-01-01", day(0), day(1), 100, 1.0, "r1", day(40), 12.25, 0.0),
        LedgerRow("2024-01-02", day(1), day(2), 100, 1.0, "r1", day(40), 0.0, 3.0),
        LedgerRow("2024-01-03", day(2), day(3), 100, 1.0, "r0", day(40)),  # an earlier run's: not measured
    ]
    tis = [TaskState("2024-01-01", "success"), TaskState("2024-01-02", "success"), TaskState("2024-01-04", "deferred")]
    p = build_progress(make_spec(), dag_id="d", run=run(4, started_at=day(0)), ledger_rows=rows, task_states=tis,
                       validation=None, now=day(1))  # fmt: skip
    body = render(p, [])
    assert '<span id="wait-load">12.2 s</span>' in body and '<span id="wait-pacing">3.0 s</span>' in body
    assert "(2 loaded chunk(s) waited); 1 chunk(s) waiting now (deferred" in body
    assert '<tr data-chunk="2024-01-01" data-state="loaded"><td>2024-01-01</td><td>loaded</td><td>success</td>' in body
    assert "<td>12.2</td><td>0.0</td>" in body and "<td>0.0</td><td>3.0</td>" in body
    assert '<tr data-chunk="2024-01-03" data-state="skipped">' in body and "<td>-</td><td>-</td><td>0</td>" in body


def test_page_shows_this_runs_figures_failure_reasons_and_read_vs_written():
    """Issue 24 items 5, 6, 8 on the page: a failed chunk shows no rows or rows/s of an earlier run (its rows are
    marked as that run's), why chunks failed (grouped), and rows read vs written over the load window."""
    pytest.importorskip("fastapi")  # the page is Airflow 3's (its API server is FastAPI)
    from airflow_backfill_provider.ui.app import render

    rows = [
        LedgerRow("2024-01-01", day(0), day(1), 1_000, 2.0, "r1", day(40), inserted=0, updated=10),
        LedgerRow("2024-01-02", day(1), day(2), 2_220, 0.054, "r0", day(30), inserted=2_220, updated=0),  # earlier
    ]
    tis = [TaskState("2024-01-01", "success"), TaskState("2024-01-02", "failed"), TaskState("2024-01-03", "failed")]
    errors = [ChunkFailure("2024-01-02", "permanent error (SQLSTATE P0001): injected"),
              ChunkFailure("2024-01-03", "permanent error (SQLSTATE P0001): injected")]  # fmt: skip
    p = build_progress(make_spec(), dag_id="d", run=run(3), ledger_rows=rows, task_states=tis, validation=None,
                       failures=errors)  # fmt: skip
    body = render(p, [])
    failed_row = body[body.index('<tr data-chunk="2024-01-02"') :].split("</tr>")[0]
    assert "41,111" not in failed_row and "<td class='rate'>-</td>" in failed_row  # 2,220 / 0.054 s: not this run's
    assert "2,220 (earlier run)</span>" in failed_row and 'title="loaded by run r0"' in failed_row
    assert "<td class='err'>permanent error (SQLSTATE P0001): injected</td>" in failed_row
    assert "<h2>Why 2 chunk(s) failed</h2>" in body
    assert ("<tr data-count='2'><td class='err'>permanent error (SQLSTATE P0001): injected</td><td>2</td>"
            "<td>2024-01-02, 2024-01-03</td></tr>") in body  # fmt: skip
    assert "rows: 1,000 read by this run, 10 written (0 inserted, 10 updated, 990 unchanged)" in body
    assert "rate 500 rows/s read over 2.0 s of loading" in body


@pytest.mark.parametrize(
    "diffs,status,expected",
    [
        ({"rows": 0.0, "sum(a)": 0.0005, "checksum": 1.0}, "fail",
         "checksum of the loaded columns differs: a value differs (counts and sums within thresholds: "
         "sum(a) off by 0.05%)"),
        ({"rows": 0.0, "checksum": 1.0}, "fail",
         "checksum of the loaded columns differs: a value differs (counts and sums are equal)"),
        ({"rows": 0.25, "sum(a)": 0.0005, "checksum": 1.0}, "fail",
         "rows off by 25.00% (over fail_threshold 1.00%); the checksum of the loaded columns differs too"),
        ({"rows": 0.005, "sum(a)": 0.0}, "warn", "rows off by 0.50% (over warn_threshold 0.10%)"),
        ({"rows": 0.0, "sum(a)": 0.0005}, "pass", "within thresholds (sum(a) off by 0.05%)"),
        ({"rows": 0.0}, "pass", "equal"),
    ],
)  # fmt: skip
def test_one_wording_of_a_days_validation_reason(diffs, status, expected):
    """Never a sum under the threshold as the reason, never the checksum's 0/1 as "off by 100%"."""
    from airflow_backfill_provider.observe.progress import day_reason

    assert day_reason(diffs, status, 0.001, 0.01) == expected


def test_a_missing_pool_is_named_with_its_fix_on_the_page_in_status_and_the_eta():
    """Issue 24 item 3: chunks of a missing pool stay 'scheduled' (pending); the page and ``status`` say which
    pool and how to create it, and the ETA names the cause instead of 'no chunk loaded yet'."""
    from airflow_backfill_provider.observe.progress import format_text, missing_pool_problem

    tis = [TaskState("2024-01-01", "scheduled"), TaskState("2024-01-02", "scheduled")]
    p = build_progress(make_spec(), dag_id="d", run=run(2), ledger_rows=[], task_states=tis, validation=None)
    missing_pool_problem(p, "reports")
    fix = 'airflow pools set reports 4 "source slots for backfills" --include-deferred'
    text = format_text(p)
    assert "PROBLEM: The Airflow pool 'reports' (spec key 'pool') does not exist" in text and fix in text
    assert "ETA: unknown (pool 'reports' missing: 2 chunk(s) cannot start)" in text
    assert p.to_dict()["problems"] == p.problems and len(p.problems) == 1
    if importlib.util.find_spec("fastapi") is not None:  # the page is Airflow 3's
        from airflow_backfill_provider.ui.app import render

        body = render(p, [])
        assert '<div class="card problem" id="problems"><p>The Airflow pool &#x27;reports&#x27;' in body
        assert html.escape(fix) in body
