"""Validation on real PostgreSQL: per-day counts and sums, thresholds, timezone days, the summary row."""

from __future__ import annotations

import datetime as dt

import pendulum
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.validate import FAIL, PASS, WARN, relative_diff, validate_range
from tests import specs

ORDERS = """
CREATE TABLE public.orders (
    id         bigint PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    amount     numeric(12,2),
    qty        integer
)
"""
# one order per hour from 2024-01-01 00:00 UTC: 24 a day; amounts vary so sums are not trivial
FILL = """
INSERT INTO public.orders
SELECT g, timestamptz '2024-01-01 00:00+00' + (g - 1) * interval '1 hour',
       timestamptz '2024-01-01 00:00+00' + (g - 1) * interval '1 hour',
       round((100 + mod(g, 17) * 3.25)::numeric, 2), 1 + mod(g, 5)
FROM generate_series(1, %(n)s) AS g
"""


def make_spec(**over):
    """public.orders, the sums of amount and qty validated."""
    sums = {"source_table": "public.orders", "validation": {"sum_columns": ["amount", "qty"]}}
    return specs.make_spec(**{**sums, **over})


def utc(*args) -> pendulum.DateTime:
    return pendulum.datetime(*args, tz="UTC")


@pytest.fixture()
def copied(src_url, dst_url, pg):
    """Identical orders in source and destination: 10 days x 24 rows (2024-01-01 .. 2024-01-10 UTC)."""
    for url in (src_url, dst_url):
        with pg(url).cursor() as cur:
            cur.execute(ORDERS)
            cur.execute(FILL, {"n": 240})
    return src_url, dst_url


def run(spec, start, end, src, dst, **kw):
    return validate_range(spec, start, end, source=src, destination=dst, **kw)


def day(report, d: str):
    return next(x for x in report.days if x.day == dt.date.fromisoformat(d))


def test_relative_diff_rules():
    assert relative_diff(100, 100) == 0.0
    assert relative_diff(0, 0) == 0.0 and relative_diff(None, None) == 0.0
    assert relative_diff(24, 0) == 1.0  # day missing in the destination
    assert relative_diff(0, 24) == 1.0  # day only in the destination
    assert relative_diff(1000, 1010) == pytest.approx(0.01)  # relative to the source


def test_clean_copy_passes_and_stores_a_summary_row(copied, pg):
    src, dst = copied
    spec = make_spec()
    report = run(spec, utc(2024, 1, 1), utc(2024, 1, 11), src, dst, dag_id="backfill_orders", run_id="manual__1")
    assert report.status == PASS
    assert len(report.days) == 10
    assert all(d.source_rows == d.destination_rows == 24 for d in report.days)
    totals = report.totals()
    assert totals["status"] == "pass" and totals["days"] == 10 and totals["days_fail"] == 0
    assert totals["source_rows"] == totals["destination_rows"] == 240
    assert totals["sums"]["amount"]["source"] == totals["sums"]["amount"]["destination"] > 0
    assert "PASS" in report.format_table().splitlines()[0]

    with pg(dst).cursor() as cur:
        cur.execute(
            "SELECT dag_id, run_id, target_table, days, source_rows, destination_rows, status, worst_diff,"
            " totals->>'status' FROM public.backfill_validation"
        )
        assert cur.fetchall() == [("backfill_orders", "manual__1", "public.orders", 10, 240, 240, "pass", 0.0, "pass")]
    run(spec, utc(2024, 1, 1), utc(2024, 1, 11), src, dst)  # one row per validation run
    with pg(dst).cursor() as cur:
        cur.execute("SELECT count(*) FROM public.backfill_validation")
        assert cur.fetchone()[0] == 2


def test_missing_day_in_destination_is_caught_and_named(copied, pg):
    src, dst = copied
    with pg(dst).cursor() as cur:
        cur.execute(
            "DELETE FROM public.orders WHERE created_at >= '2024-01-04 00:00+00' AND created_at < '2024-01-05 00:00+00'"
        )
    report = run(make_spec(), utc(2024, 1, 1), utc(2024, 1, 11), src, dst)
    assert report.status == FAIL
    totals = report.totals()
    assert totals["failed_days"] == ["2024-01-04"] and totals["worst_day"] == "2024-01-04"
    assert totals["worst_diff"] == 1.0
    missing = day(report, "2024-01-04")
    assert (missing.source_rows, missing.destination_rows, missing.status) == (24, 0, FAIL)
    assert all(d.status == PASS for d in report.days if d is not missing)
    table = report.format_table().splitlines()
    first = table[3]  # header line, column names, dashes, then worst day first
    assert first.startswith("2024-01-04") and "FAIL" in first and "100.00%" in first
    with pg(dst).cursor() as cur:  # the stored row names the day too, for a dashboard
        cur.execute("SELECT status, worst_day::text, totals->'days_not_passing' FROM public.backfill_validation")
        status, worst_day, not_passing = cur.fetchone()
    assert (status, worst_day) == ("fail", "2024-01-04")
    assert [(d["day"], d["source_rows"], d["destination_rows"]) for d in not_passing] == [("2024-01-04", 24, 0)]


def test_corrupted_sum_is_caught_and_named(copied, pg):
    src, dst = copied
    with pg(dst).cursor() as cur:
        # one row of 2024-01-07 gets 10x its amount: counts still match, the day's sum does not
        cur.execute(
            "UPDATE public.orders SET amount = amount * 10 WHERE id = (SELECT min(id) FROM public.orders WHERE created_at >= '2024-01-07 00:00+00')"
        )
    report = run(make_spec(), utc(2024, 1, 1), utc(2024, 1, 11), src, dst)
    assert report.status == FAIL
    bad = day(report, "2024-01-07")
    assert bad.status == FAIL and bad.worst_metric == "sum(amount)"
    assert bad.diffs["rows"] == 0.0 and bad.diffs["sum(qty)"] == 0.0
    assert report.totals()["failed_days"] == ["2024-01-07"]
    assert report.format_table().splitlines()[3].startswith("2024-01-07  FAIL")


def test_difference_between_thresholds_warns(copied, pg):
    src, dst = copied
    with pg(dst).cursor() as cur:
        # +12.00 on a day whose amount sum is ~2,8xx: about 0.4%, between 0.1% and 1%
        cur.execute("UPDATE public.orders SET amount = amount + 12 WHERE id = 100")
    # thresholds apply to counts and sums; the checksum (on by default) fails any altered value
    assert day(run(make_spec(), utc(2024, 1, 1), utc(2024, 1, 11), src, dst), "2024-01-05").status == FAIL
    no_checksum = {"sum_columns": ["amount", "qty"], "checksum": False}
    report = run(make_spec(validation=no_checksum), utc(2024, 1, 1), utc(2024, 1, 11), src, dst)
    assert report.status == WARN
    warned = [d for d in report.days if d.status == WARN]
    assert len(warned) == 1 and warned[0].day == dt.date(2024, 1, 5)
    assert 0.001 < warned[0].worst_diff < 0.01
    # the same difference passes under looser thresholds and fails under tighter ones
    loose = make_spec(
        validation={"sum_columns": ["amount"], "warn_threshold": 0.005, "fail_threshold": 0.05, "checksum": False}
    )
    assert run(loose, utc(2024, 1, 1), utc(2024, 1, 11), src, dst, store=False).status == PASS
    tight = make_spec(
        validation={"sum_columns": ["amount"], "warn_threshold": 0.0, "fail_threshold": 0.001, "checksum": False}
    )
    assert run(tight, utc(2024, 1, 1), utc(2024, 1, 11), src, dst, store=False).status == FAIL


def test_rows_outside_the_range_are_ignored(copied, pg):
    src, dst = copied
    with pg(dst).cursor() as cur:
        # live ingest wrote later rows, and an earlier load left rows before the range
        cur.execute(
            "INSERT INTO public.orders VALUES (10001, '2024-01-08 05:00+00', now(), 999, 9), (10002, '2023-12-31 23:59:59+00', now(), 5, 1)"
        )
    with pg(src).cursor() as cur:
        cur.execute(
            "UPDATE public.orders SET amount = 0 WHERE created_at >= '2024-01-09 00:00+00'"
        )  # changed after the range
    report = run(make_spec(), utc(2024, 1, 1), utc(2024, 1, 8), src, dst)
    assert report.status == PASS
    assert [d.day for d in report.days] == [dt.date(2024, 1, d) for d in range(1, 8)]
    assert report.totals()["destination_rows"] == 7 * 24


def test_days_are_local_days_in_the_spec_timezone(src_url, dst_url, pg):
    """America/New_York: UTC-5 in January; 2024-03-10 has 23 hours (DST starts)."""
    for url in (src_url, dst_url):
        with pg(url).cursor() as cur:
            cur.execute(ORDERS)
            cur.execute(
                "INSERT INTO public.orders SELECT g, timestamptz '2024-03-08 00:00+00' + g * interval '1 hour',"
                " timestamptz '2024-03-20 00:00+00', 10, 1 FROM generate_series(0, 24 * 6 - 1) AS g"
            )
    spec = make_spec(timezone="America/New_York")
    ny = lambda *a: pendulum.datetime(*a, tz="America/New_York")  # noqa: E731
    report = run(spec, ny(2024, 3, 9), ny(2024, 3, 12), src_url, dst_url)
    assert report.status == PASS
    assert {d.day.isoformat(): d.source_rows for d in report.days} == {
        "2024-03-09": 24,
        "2024-03-10": 23,
        "2024-03-11": 24,
    }
    # 2024-03-11 03:00 UTC is still 2024-03-10 in New York (23:00 EDT): that day must be named
    with pg(dst_url).cursor() as cur:
        cur.execute("DELETE FROM public.orders WHERE created_at = '2024-03-11 03:00+00'")
        # a row the source has just before the range start (2024-03-08 23:00 EST) is outside the range
        cur.execute("DELETE FROM public.orders WHERE created_at = '2024-03-09 04:00+00'")
    report = run(spec, ny(2024, 3, 9), ny(2024, 3, 12), src_url, dst_url)
    bad = [d for d in report.days if d.status != PASS]
    assert [d.day.isoformat() for d in bad] == ["2024-03-10"]
    assert (bad[0].source_rows, bad[0].destination_rows) == (23, 22)
    assert bad[0].status == FAIL  # 1/23 = 4.3%


def test_partial_days_at_range_edges_compare_only_inside(copied, pg):
    src, dst = copied
    with pg(dst).cursor() as cur:
        cur.execute("DELETE FROM public.orders WHERE created_at < '2024-01-02 06:00+00'")
    # the range starts at 06:00: what the destination lacks before it is not this run's business
    report = run(make_spec(), utc(2024, 1, 2, 6), utc(2024, 1, 3, 12), src, dst)
    assert report.status == PASS
    assert [(d.day.isoformat(), d.source_rows) for d in report.days] == [("2024-01-02", 18), ("2024-01-03", 12)]


def test_long_reports_are_capped(copied, pg):
    src, dst = copied
    with pg(dst).cursor() as cur:
        cur.execute("UPDATE public.orders SET qty = qty + 1")  # every day fails
    report = run(make_spec(), utc(2024, 1, 1), utc(2024, 1, 11), src, dst, store=False)
    lines = report.format_table(max_lines=4).splitlines()
    assert lines[-1] == "... and 6 more days (6 fail)"
    assert len(lines) == 3 + 4 + 1


def test_missing_sum_column_is_named(copied):
    src, dst = copied
    spec = make_spec(validation={"sum_columns": ["amount", "total"]})
    with pytest.raises(PermanentChunkError, match=r"no column\(s\) \['total'\].*validation.sum_columns"):
        run(spec, utc(2024, 1, 1), utc(2024, 1, 2), src, dst)


def test_report_table_name_is_quoted(copied, pg):
    src, dst = copied
    spec = make_spec(validation={"sum_columns": ["amount"], "report_table": 'ops.Validation "runs"'})
    assert run(spec, utc(2024, 1, 1), utc(2024, 1, 2), src, dst).status == PASS
    with pg(dst).cursor() as cur:
        cur.execute(sql.SQL("SELECT status FROM {}").format(sql.Identifier("ops", 'Validation "runs"')))
        assert cur.fetchall() == [("pass",)]


def test_source_session_is_read_only(copied, pg):
    src, dst = copied
    with pg(src).cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'backfill_validation'")
        before = cur.fetchone()[0]
    run(make_spec(), utc(2024, 1, 1), utc(2024, 1, 2), src, dst)
    with pg(src).cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'backfill_validation'")
        assert cur.fetchone()[0] == before == 0  # the summary goes to the destination only


# 90 days x 24 rows, inserted in an order unrelated to created_at (a multiplicative hash of id)
SCATTERED_FILL = """
INSERT INTO public.orders
SELECT g, at, at, round((100 + mod(g, 17) * 3.25)::numeric, 2), 1 + mod(g, 5)
FROM generate_series(1, 2160) AS g,
     LATERAL (SELECT timestamptz '2024-01-01 00:00+00' + ((g::bigint * 7919) % 2160) * interval '1 hour' AS at) AS x
"""


@pytest.mark.parametrize("analyze_destination", [True, False])
def test_a_scattered_table_is_read_in_one_statement_and_differences_are_still_named(
    analyze_destination, src_url, dst_url, pg
):
    """Time column not in physical order: each side runs one statement over the range instead of one per
    month (a destination without statistics yet follows the source), and still names the days that differ."""
    for url in (src_url, dst_url):
        with pg(url).cursor() as cur:
            cur.execute(ORDERS)
            cur.execute(SCATTERED_FILL)
            if url == src_url or analyze_destination:
                cur.execute("ANALYZE public.orders")
    report = run(make_spec(), utc(2024, 1, 1), utc(2024, 3, 31), src_url, dst_url)
    assert report.status == PASS and len(report.days) == 90
    assert report.totals()["source_rows"] == report.totals()["destination_rows"] == 90 * 24
    assert any(n.startswith("source public.orders: created_at is not in physical order") for n in report.notes)
    assert any(n.startswith("destination public.orders: created_at is not in physical order") for n in report.notes)
    with pg(dst_url).cursor() as cur:
        cur.execute(
            "DELETE FROM public.orders WHERE id = (SELECT min(id) FROM public.orders WHERE created_at::date = '2024-02-10')"
        )
        cur.execute(
            "UPDATE public.orders SET qty = qty + 1 WHERE id = (SELECT min(id) FROM public.orders WHERE created_at::date = '2024-03-05')"
        )
        cur.execute("INSERT INTO public.orders VALUES (99999, '2024-04-02 05:00+00', now(), 1, 1)")  # after the range
    report = run(make_spec(), utc(2024, 1, 1), utc(2024, 3, 31), src_url, dst_url)
    assert report.totals()["failed_days"] == ["2024-02-10", "2024-03-05"]
    assert day(report, "2024-02-10").destination_rows == 23 and day(report, "2024-03-05").worst_metric == "sum(qty)"
    # a range inside the table: only its days
    part = run(make_spec(), utc(2024, 2, 1), utc(2024, 2, 8), src_url, dst_url, store=False)
    assert [d.day for d in part.days] == [dt.date(2024, 2, d) for d in range(1, 8)] and part.status == PASS
