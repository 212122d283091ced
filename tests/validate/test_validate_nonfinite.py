"""Validation's per-day sums compare NaN and +-Infinity as values (issue 25): a day passes only when both sides
hold the same one. Real float8 and numeric columns, checksum off so the sums alone decide."""

from __future__ import annotations

import datetime as dt
import json
import math
from decimal import Decimal

import pytest

from airflow_backfill_provider.validate import FAIL, PASS, WARN, classify, relative_diff
from tests.validate.test_validate import day, make_spec, run, utc

TABLE = """
CREATE TABLE public.orders (
    id         bigint PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    f          float8,
    n          numeric
)
"""

# day of January 2024 -> (source value, destination value), one row that day; the same text goes to f and n
CASES = {
    1: ("1.5", "1.5"),
    2: ("NaN", "NaN"),
    3: ("NaN", "1.5"),
    4: ("1.5", "NaN"),
    5: ("Infinity", "Infinity"),
    6: ("Infinity", "1.5"),
    7: ("1.5", "-Infinity"),
    8: ("Infinity", "-Infinity"),
    9: ("-Infinity", "NaN"),
    10: ("0", "NaN"),
}
EQUAL = {1, 2, 5}

INSERT = """
INSERT INTO public.orders
VALUES (%(id)s, %(at)s, %(at)s, %(v)s::float8, %(v)s::numeric),
       (%(id)s + 100, %(at)s, %(at)s, 2, 2)  -- a finite row beside it: the sum is NaN/Infinity, not the value
"""


@pytest.fixture()
def nonfinite(src_url, dst_url, pg):
    for side, url in enumerate((src_url, dst_url)):
        with pg(url).cursor() as cur:
            cur.execute(TABLE)
            for d, values in CASES.items():
                at = dt.datetime(2024, 1, d, 12, tzinfo=dt.timezone.utc)
                cur.execute(INSERT, {"id": d, "at": at, "v": values[side]})
    return src_url, dst_url


@pytest.mark.parametrize("column", ["f", "n"])
def test_nan_and_infinity_days_pass_only_when_both_sides_hold_the_same(nonfinite, pg, column):
    src, dst = nonfinite
    # thresholds no finite difference reaches: only a NaN/Infinity mismatch can fail a day
    spec = make_spec(
        validation={"sum_columns": [column], "checksum": "off", "warn_threshold": 1000, "fail_threshold": 1000}
    )
    report = run(spec, utc(2024, 1, 1), utc(2024, 1, 11), src, dst, dag_id="nf", run_id=f"nf_{column}")
    got = {d: day(report, f"2024-01-{d:02d}").status for d in CASES}
    assert got == {d: PASS if d in EQUAL else FAIL for d in CASES}, got
    assert report.status == FAIL
    totals = report.totals()
    json.dumps(totals, allow_nan=False)  # the XCom stays strict JSON
    assert totals["worst_diff"] == "Infinity" and totals["worst_metric"] == f"sum({column})"
    assert "differs" in report.format_table()
    with pg(dst).cursor() as cur:  # the summary row was stored (jsonb refuses NaN and Infinity tokens)
        cur.execute("SELECT status, worst_diff, totals->'days_not_passing' FROM public.backfill_validation")
        status, worst_diff, not_passing = cur.fetchone()
    assert (status, worst_diff) == ("fail", math.inf)
    assert sorted(d["day"] for d in not_passing) == [f"2024-01-{d:02d}" for d in sorted(set(CASES) - EQUAL)]


def test_relative_diff_nan_and_infinity_as_values():
    nan, inf = Decimal("NaN"), Decimal("Infinity")
    assert relative_diff(nan, nan) == 0.0
    assert relative_diff(inf, inf) == 0.0 and relative_diff(-inf, -inf) == 0.0
    assert relative_diff(float("nan"), float("nan")) == 0.0 and relative_diff(math.inf, math.inf) == 0.0
    for s, d in [(nan, 1), (1, nan), (nan, None), (inf, 1), (1, -inf), (inf, -inf), (inf, nan), (nan, 0), (0, -inf)]:
        assert relative_diff(s, d) == math.inf, (s, d)
    assert relative_diff(Decimal("1.5"), Decimal("1.5")) == 0.0  # finite values as before
    assert relative_diff(1000, 1010) == pytest.approx(0.01)


def test_classify_fails_nan_and_infinity_whatever_the_thresholds():
    assert classify(math.inf, 1e9, 1e9) == FAIL
    assert classify(math.nan, 1e9, 1e9) == FAIL  # NaN compares false with everything: never a pass
    assert classify(0.0, 0.0, 0.0) == PASS
    assert classify(0.02, 0.01, 0.05) == WARN and classify(0.06, 0.01, 0.05) == FAIL


def test_failure_message_names_a_nan_or_infinity_difference(nonfinite):
    """The task's failure message formats the worst difference; NaN/Infinity against another value is text."""
    from airflow_backfill_provider.core.compat import AirflowFailException
    from airflow_backfill_provider.operators.validate import ValidateBackfillOperator

    src, dst = nonfinite
    spec = make_spec(validation={"sum_columns": ["n"], "checksum": "off"})
    task = ValidateBackfillOperator(
        task_id="v",
        spec=spec,
        start="2024-01-01T00:00:00+00:00",
        end="2024-01-11T00:00:00+00:00",
        source=src,
        destination=dst,
    )
    with pytest.raises(AirflowFailException) as info:
        task.execute({"run_id": "nf_message"})
    assert "off by NaN or Infinity against a different value" in str(info.value), str(info.value)
