"""Schema drift on real PostgreSQL: current-schema mode, historical ranges, cast failures.

The story: until 2021-06-01 orders lived in ``"Orders Archive"`` (time column ``created``, integer
``"Amount Cents"``); since then in ``orders`` (``amount`` numeric, a ``legacy_flag`` the warehouse
does not want, no ``channel``). The destination has ``amount numeric(12,2)``, ``channel`` and a
``note varchar(8)``. Both source tables also hold rows on the wrong side of the cutover, with wrong
values, so reading the wrong table for a date shows up in the data and in validation.
"""

from __future__ import annotations

import pendulum
import pytest

from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.core.exceptions import PermanentChunkError, SpecError
from airflow_backfill_provider.plan.planning import build_plan
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from airflow_backfill_provider.validate import validate_range
from tests import specs

# 4 orders a day, every 6 hours, 2021-05-24 .. 2021-06-08 (i = 0..63, id = i + 1)
SOURCE = """
CREATE TABLE public."Orders Archive" (
    id integer PRIMARY KEY, created timestamptz NOT NULL, updated_at timestamptz NOT NULL,
    "Amount Cents" integer, channel text, note text
);
INSERT INTO public."Orders Archive"
SELECT i + 1, t, t, CASE WHEN t < '2021-06-01 00:00+00' THEN 1000 + 7 * i ELSE 1 END, 'web', 'a' || i
FROM generate_series(0, 63) AS i, LATERAL (SELECT timestamptz '2021-05-24 00:00+00' + i * interval '6 hours' AS t) x;

CREATE TABLE public.orders (
    id integer PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
    amount numeric, note text, legacy_flag boolean
);
INSERT INTO public.orders
SELECT i + 1, t, t, CASE WHEN t < '2021-06-01 00:00+00' THEN 0 ELSE (2000 + 3 * i) / 100.0 END, 'c' || i, true
FROM generate_series(20, 63) AS i, LATERAL (SELECT timestamptz '2021-05-24 00:00+00' + i * interval '6 hours' AS t) x;
INSERT INTO public.orders VALUES (9999, '2021-05-30 12:00+00', now(), 5, 'stray', false);
"""

DESTINATION = """
CREATE TABLE public.orders (
    id bigint PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
    amount numeric(12,2), channel text, note varchar(8)
)
"""

HISTORICAL = [
    {
        "until": "2021-06-01",
        "source_table": "public.Orders Archive",
        # trusted SQL from the spec author; the author quotes names that need it
        "column_expressions": {"created_at": "created", "amount": '"Amount Cents" / 100.0'},
    }
]


def make_spec(**over):
    """Weekly chunks of public.orders (the schema shows in the report's notes), the sum of amount validated."""
    weekly = {"source_table": "public.orders", "granularity": "week", "validation": {"sum_columns": ["amount"]}}
    return specs.make_spec(**{**weekly, **over})


@pytest.fixture()
def dbs(src_url, dst_url, pg):
    with pg(src_url).cursor() as cur:
        cur.execute(SOURCE)
    with pg(dst_url).cursor() as cur:
        cur.execute(DESTINATION)
    return src_url, dst_url


def load(spec, start, end, src, dst, pg):
    plan = build_plan(spec, start, end, dst_conn=pg(dst))
    return plan, [transfer_chunk(spec, c, source=src, destination=dst) for c in plan.chunks]


def rows(pg, url, lo="-infinity", hi="infinity"):
    with pg(url).cursor() as cur:
        cur.execute(
            "SELECT id, amount::text, channel, note FROM public.orders"
            " WHERE created_at >= %s AND created_at < %s ORDER BY id",
            (lo, hi),
        )
        return cur.fetchall()


def test_current_schema_mode_fills_nulls_ignores_extras_and_casts(dbs, pg):
    src, dst = dbs
    spec = make_spec(granularity="day")
    _, results = load(spec, "2021-06-01", "2021-06-09", src, dst, pg)
    assert results[0].decisions == [
        "id: source type integer cast to bigint",
        "amount: source type numeric cast to numeric(12,2)"
        " (each value checked: one the cast would change fails the chunk)",
        "channel: missing in source, loaded as NULL::text",
        "note: source type text cast to character varying(8)",
        "source-only columns ignored: ['legacy_flag']",
    ]
    got = rows(pg, dst)
    assert len(got) == 32
    assert got[0] == (33, f"{(2000 + 3 * 32) / 100:.2f}", None, "c32")
    assert all(r[2] is None for r in got)  # channel: not in the source
    report = validate_range(
        spec, pendulum.datetime(2021, 6, 1), pendulum.datetime(2021, 6, 9), source=src, destination=dst
    )
    assert report.status == "pass" and report.totals()["destination_rows"] == 32
    assert "public.orders: channel: missing in source, loaded as NULL::text" in report.notes


def test_historical_range_reads_the_archive_and_splits_the_straddling_chunk(dbs, pg):
    src, dst = dbs
    spec = make_spec(historical=HISTORICAL)
    plan, results = load(spec, "2021-05-24", "2021-06-09", src, dst, pg)
    # week 22 (Mon 2021-05-31) straddles the cutover: it is cut at 2021-06-01
    assert [(c.chunk_id, c.start.to_date_string(), c.end.to_date_string()) for c in plan.chunks] == [
        ("2021-W21", "2021-05-24", "2021-05-31"),
        ("2021-W22@2021-05-31T00:00", "2021-05-31", "2021-06-01"),
        ("2021-W22@2021-06-01T00:00", "2021-06-01", "2021-06-07"),
        ("2021-06-07..2021-06-09", "2021-06-07", "2021-06-09"),
    ]
    assert [r.rows_extracted for r in results] == [28, 4, 24, 8]
    assert 'amount: expression ("Amount Cents" / 100.0) cast to numeric(12,2)' in results[0].decisions
    assert "channel: missing in source, loaded as NULL::text" in results[2].decisions

    got = {r[0]: r[1:] for r in rows(pg, dst)}
    assert len(got) == 64 and 9999 not in got  # the stray row of the current table before the cutover
    assert got[1] == (f"{1000 / 100:.2f}", "web", "a0")  # archive: cents / 100, its channel and note
    assert got[32] == (f"{(1000 + 7 * 31) / 100:.2f}", "web", "a31")  # last archive row (05-31 18:00)
    assert got[33] == (f"{(2000 + 3 * 32) / 100:.2f}", None, "c32")  # first current row (06-01 00:00)

    # validation reads the same places per date, so a faithful load passes ...
    start, end = pendulum.datetime(2021, 5, 24), pendulum.datetime(2021, 6, 9)
    report = validate_range(spec, start, end, source=src, destination=dst)
    assert report.status == "pass", report.format_table()
    assert [d.source_rows for d in report.days] == [4] * 16
    assert any("Orders Archive: amount: expression" in n for n in report.notes)
    # ... and a changed archive-era value is caught on its day
    with pg(dst).cursor() as cur:
        cur.execute("UPDATE public.orders SET amount = amount + 5 WHERE id = 10")  # 2021-05-26 06:00
    report = validate_range(spec, start, end, source=src, destination=dst)
    assert report.status == "fail" and report.totals()["failed_days"] == ["2021-05-26"]


def test_rerun_of_historical_load_is_idempotent(dbs, pg):
    src, dst = dbs
    spec = make_spec(historical=HISTORICAL)
    load(spec, "2021-05-24", "2021-06-09", src, dst, pg)
    before = rows(pg, dst)
    plan = build_plan(spec, "2021-05-24", "2021-06-09", reprocess=True, dst_conn=pg(dst))
    again = [transfer_chunk(spec, c, source=src, destination=dst) for c in plan.chunks]
    assert sum(r.inserted + r.updated for r in again) == 0
    assert rows(pg, dst) == before


def test_cast_failure_names_column_chunk_and_value_and_loads_nothing_for_the_chunk(dbs, pg):
    src, dst = dbs
    with pg(src).cursor() as cur:
        cur.execute("UPDATE public.orders SET amount = 123456789012.5 WHERE id = 40")  # 2021-06-02 18:00
    spec = make_spec(granularity="day")
    plan = build_plan(spec, "2021-06-01", "2021-06-04", dst_conn=pg(dst))
    outcomes = {}
    for chunk in plan.chunks:
        try:
            outcomes[chunk.chunk_id] = transfer_chunk(spec, chunk, source=src, destination=dst).rows_extracted
        except PermanentChunkError as err:
            outcomes[chunk.chunk_id] = str(err)
    msg = outcomes["2021-06-02"]
    assert isinstance(msg, str), outcomes
    assert msg.startswith("chunk 2021-06-02: column 'amount' cannot take value '123456789012.5'")
    assert "at key (id)=(40)" in msg and "numeric(12,2)" in msg and "SQLSTATE 22003" in msg
    assert "Nothing was loaded for this chunk" in msg
    assert outcomes["2021-06-01"] == 4 and outcomes["2021-06-03"] == 4
    assert rows(pg, dst, "2021-06-02 00:00+00", "2021-06-03 00:00+00") == []
    with pg(dst).cursor() as cur:
        cur.execute("SELECT chunk_id FROM public.backfill_ledger ORDER BY 1")
        assert [r[0] for r in cur.fetchall()] == ["2021-06-01", "2021-06-03"]


def test_too_long_text_fails_instead_of_being_truncated(dbs, pg):
    src, dst = dbs
    with pg(src).cursor() as cur:
        cur.execute("UPDATE public.orders SET note = 'much too long' WHERE id = 45")  # 2021-06-04 00:00
    spec = make_spec(granularity="day")
    chunk = Chunk("2021-06-04", pendulum.datetime(2021, 6, 4), pendulum.datetime(2021, 6, 5))
    with pytest.raises(PermanentChunkError) as err:
        transfer_chunk(spec, chunk, source=src, destination=dst)
    assert "column 'note' cannot take value 'much too long'" in str(err.value)
    assert "character varying(8)" in str(err.value) and "at key (id)=(45)" in str(err.value)
    assert rows(pg, dst) == []


def test_failing_historical_expression_is_reported(dbs, pg):
    src, dst = dbs
    broken = [{**HISTORICAL[0], "column_expressions": {"created_at": "created", "amount": '"Amount Cents" / (id - 5)'}}]
    spec = make_spec(historical=broken)
    chunk = Chunk("2021-W21", pendulum.datetime(2021, 5, 24), pendulum.datetime(2021, 5, 31))
    with pytest.raises(PermanentChunkError) as err:
        transfer_chunk(spec, chunk, source=src, destination=dst)
    text = str(err.value)
    assert text.startswith(
        "chunk 2021-W21: a historical column expression failed at the row after key (id)=(4) (scan order)"
    )
    assert "division by zero" in text and "historical.column_expressions" in text


def test_expressions_must_be_single_expressions():
    for bad in ('"Amount Cents" / 100.0 -- cents', "amount; DROP TABLE orders", "amount /* x */"):
        hist = [{"until": "2021-06-01", "column_expressions": {"amount": bad}}]
        with pytest.raises(SpecError, match=r"historical\.0\.column_expressions: .*one SQL expression"):
            make_spec(historical=hist)


def test_validation_names_a_missing_historical_source_table(dbs, pg):
    src, dst = dbs
    spec = make_spec(historical=[{"until": "2021-06-01", "source_table": "public.orders_2020"}])
    with pytest.raises(PermanentChunkError, match=r"source table 'public.orders_2020' does not exist"):
        validate_range(spec, pendulum.datetime(2021, 5, 30), pendulum.datetime(2021, 6, 2), source=src, destination=dst)


def test_documented_drift_config_is_the_tested_one():
    """docs/drift-and-validation.md shows docs/examples/orders_drift.yaml verbatim; it is this file's HISTORICAL."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "examples" / "orders_drift.yaml").read_text()
    assert text.strip() in (root / "docs" / "drift-and-validation.md").read_text()
    spec = load_spec(yaml.safe_load(text))
    assert spec.historical == make_spec(historical=HISTORICAL).historical
    assert spec.validation.sum_columns == ["amount"]


@pytest.mark.parametrize(
    "expr, column",
    [
        ("created", "created"),
        ("  CREATED ", "created"),  # unquoted folds to lower case, as PostgreSQL resolves it
        ('"created"', "created"),
        ('"Created At"', "Created At"),
        ('"CREATED"', None),  # quoted: exact case, and the source has no such column
        ("created + interval '1 hour'", None),  # computed: no column to check for an index or NULLs
        ("other", None),
    ],
)
def test_the_plan_knows_which_source_column_a_historical_time_expression_is(expr, column):
    from airflow_backfill_provider.prepare.drift import plan_columns
    from airflow_backfill_provider.prepare.catalog import Column

    spec = make_spec()
    dest = [Column("id", "bigint"), Column("created_at", "timestamp with time zone")]
    src = [Column("id", "bigint"), Column("created", "timestamp with time zone"), Column("Created At", "date")]
    plan = plan_columns(spec, dest, src, expressions={"created_at": expr})
    assert plan.time_filter_column == column
    assert plan_columns(spec, dest, [*src, Column("created_at", "date")]).time_filter_column == "created_at"


def test_plan_preflight_checks_each_source_once_and_names_a_computed_time_filter(dbs, pg):
    """The plan's pre-flight (planning.preflight) on the archive's bare column and on a computed expression."""
    import logging

    from airflow_backfill_provider.plan.planning import preflight

    src, dst = dbs
    for time_expr, expect in (
        ("created", "Source public.Orders Archive has no index leading on created:"),
        ("created + interval '0 hours'", "filter on the expression (created + interval '0 hours')"),
    ):
        historical = [
            {**HISTORICAL[0], "column_expressions": {**HISTORICAL[0]["column_expressions"], "created_at": time_expr}}
        ]
        spec = make_spec(historical=historical)
        plan = build_plan(spec, "2021-05-24", "2021-06-08", dst_conn=pg(dst))
        lines = preflight(spec, plan, pg(src), pg(dst))
        warnings = [text for level, text in lines if level == logging.WARNING]
        assert any(expect in w for w in warnings), warnings
        decisions = [text for level, text in lines if "Schema decision" in text]
        # two source ranges (the archive, then the live table): each checked once, not once per chunk
        assert {d.split(" (from ")[1].split(")")[0] for d in decisions} == {"public.Orders Archive", "public.orders"}
