"""Range resolution (pure) and the plan against a real destination (ledger skip, watermark clip)."""

import datetime as dt

import pendulum
import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.core.exceptions import PlanError, WatermarkError
from airflow_backfill_provider.plan.planning import build_plan, resolve_range
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from airflow_backfill_provider.prepare.watermark import WATERMARK_COLUMNS
from tests.specs import make_spec, table_spec


def test_params_win_over_the_data_interval():
    spec = make_spec()
    lo, hi = resolve_range(
        spec,
        param_start="2024-01-01",
        param_end="2024-02-01",
        run_type="scheduled",
        interval_start=pendulum.datetime(2020, 1, 1),
        interval_end=pendulum.datetime(2020, 1, 2),
    )
    assert (lo.date(), hi.date()) == (dt.date(2024, 1, 1), dt.date(2024, 2, 1))


def test_backfill_runs_use_their_data_interval():
    spec = make_spec(timezone="America/New_York")
    lo, hi = resolve_range(
        spec,
        param_start=None,
        param_end=None,
        run_type="backfill",
        interval_start=pendulum.datetime(2024, 3, 10, 5, tz="UTC"),
        interval_end=pendulum.datetime(2024, 3, 11, 4, tz="UTC"),
    )
    assert lo.isoformat() == "2024-03-10T00:00:00-05:00" and hi.isoformat() == "2024-03-11T00:00:00-04:00"


@pytest.mark.parametrize("start, end", [("2024-01-01", "2024-02-01"), ("2024-01-01", None), (None, "2024-02-01")])
def test_a_backfill_run_refuses_start_and_end(start, end):
    """Every run of a backfill gets the same conf: start/end would load one range N times, so they are refused
    naming the params and the fix."""
    with pytest.raises(PlanError) as err:
        resolve_range(
            make_spec(),
            param_start=start,
            param_end=end,
            run_type="backfill",
            interval_start=pendulum.datetime(2020, 1, 1),
            interval_end=pendulum.datetime(2020, 1, 2),
        )
    assert f"start={start!r}" in str(err.value) and f"end={end!r}" in str(err.value)
    assert "Leave start and end empty in backfill mode" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (
            dict(param_start=None, param_end=None, run_type="manual", interval_start=None, interval_end=None),
            "needs the params 'start' and 'end'",
        ),
        (
            dict(param_start="2024-01-01", param_end=None, run_type="manual", interval_start=None, interval_end=None),
            "param 'end' is empty",
        ),
        (
            dict(
                param_start=None,
                param_end=None,
                run_type="scheduled",
                interval_start=pendulum.datetime(2024, 1, 1),
                interval_end=pendulum.datetime(2024, 1, 1),
            ),
            "zero-width|is empty",
        ),
        (
            dict(
                param_start="2024-01-01'; DROP TABLE orders; --",
                param_end="2024-02-01",
                run_type="manual",
                interval_start=None,
                interval_end=None,
            ),
            "is not a date",
        ),
    ],
)
def test_range_errors(kwargs, fragment):
    with pytest.raises(PlanError, match=fragment):
        resolve_range(make_spec(), **kwargs)


def test_plan_skips_ledgered_chunks_unless_reprocess(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=500, days=5, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    spec = make_spec(src_url, dst_url)
    for c in plan_chunks("2024-01-01", "2024-01-03", "day", "UTC"):
        transfer_chunk(spec, c)
    conn = pg(dst_url)
    plan = build_plan(spec, "2024-01-01", "2024-01-06", dst_conn=conn)
    assert [c.chunk_id for c in plan.chunks] == ["2024-01-03", "2024-01-04", "2024-01-05"]
    assert [c.chunk_id for c in plan.skipped] == ["2024-01-01", "2024-01-02"]
    assert len(build_plan(spec, "2024-01-01", "2024-01-06", reprocess=True, dst_conn=conn).chunks) == 5


def test_plan_clips_to_or_refuses_the_live_watermark(dst_url, pg):
    conn = pg(dst_url)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE backfill_watermarks ({WATERMARK_COLUMNS})")
        cur.execute(
            "INSERT INTO backfill_watermarks (target_table, watermark) VALUES ('public.orders', '2024-01-03T12:00Z')"
        )
    spec = make_spec(dst=dst_url)
    plan = build_plan(spec, "2024-01-01", "2024-01-10", dst_conn=conn)
    assert plan.clipped and plan.end == pendulum.datetime(2024, 1, 3, 12, tz="UTC")
    assert [c.chunk_id for c in plan.chunks] == [
        "2024-01-01",
        "2024-01-02",
        "2024-01-03T00:00+00:00..2024-01-03T12:00+00:00",
    ]
    with pytest.raises(WatermarkError, match="after the live watermark"):
        build_plan(make_spec(dst=dst_url, watermark={"policy": "refuse"}), "2024-01-01", "2024-01-10", dst_conn=conn)
    assert build_plan(spec, "2024-01-05", "2024-01-10", dst_conn=conn).chunks == []


@pytest.mark.parametrize(
    "version_type, warned",
    [("date", True), ("timestamp(0) with time zone", True), ("timestamptz", False), ("bigint", False)],
)
def test_a_coarse_version_column_is_warned_about(version_type, warned, src_url, dst_url, pg):
    """A date (or whole-second) version ties within a day (second): the plan says what that costs."""
    import logging

    from airflow_backfill_provider.plan.planning import preflight

    for url in (src_url, dst_url):
        pg(url).cursor().execute(
            f"DROP TABLE IF EXISTS coarse; CREATE TABLE coarse (id bigint PRIMARY KEY, d date NOT NULL, v {version_type})"
        )
    spec = table_spec(src_url, dst_url, "coarse", time_column="d", version_column="v")
    plan = build_plan(spec, "2024-01-01", "2024-01-03")
    src, dst = pg(src_url), pg(dst_url)
    warnings = [m for level, m in preflight(spec, plan, src, dst) if level == logging.WARNING and "version_column" in m]
    assert bool(warnings) == warned, warnings
