"""Validation when the destination's column types differ from the source's (gap 1 of the corr brief).

The destination holds types the source does not have (an enum, an enum array, a domain over text, a
domain over numeric used as a sum column, citext) and built-in type changes whose result depends on the
session's TimeZone (``timestamptz -> timestamp``, ``timestamptz -> date``) under a non-UTC spec timezone.
Validation (checksum on) must pass when the data is equal, and fail naming the day when one value differs,
including a change that only citext's or an enum's ``=`` would call equal.
"""

from __future__ import annotations

import psycopg2
import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from airflow_backfill_provider.validate import FAIL, PASS, validate_range
from tests.session_helpers import run_sql
from tests.specs import table_spec

SOURCE = """
CREATE TABLE ev (
    id int PRIMARY KEY, at timestamptz NOT NULL, mood text, tags text[], email text, amt numeric,
    name text, seen timestamptz, seen_day timestamptz, n int
)
"""
DEST_TYPES = """
CREATE TYPE mood AS ENUM ('happy', 'sad', 'ok');
CREATE DOMAIN email AS text CHECK (VALUE LIKE '%@%');
CREATE DOMAIN amount AS numeric(12,2) CHECK (VALUE >= 0);
"""
DEST = """
CREATE TABLE ev (
    id int PRIMARY KEY, at timestamptz NOT NULL, mood mood, tags mood[], email email, amt amount,
    name {name_type}, seen timestamp, seen_day date, n bigint
)
"""
# 3 days (in Asia/Kolkata) x 8 rows; 19:00 UTC and later is the next local day
FILL = """
INSERT INTO ev SELECT g, timestamptz '2024-01-01 00:00+05:30' + (g - 1) * interval '3 hours',
    (ARRAY['happy','sad','ok'])[1 + g % 3], ARRAY[(ARRAY['happy','sad','ok'])[1 + g % 3], NULL],
    'u' || g || '@example.com', round(g * 1.25, 2), CASE WHEN g % 2 = 0 THEN 'Abc' ELSE 'ÄöÜ' END,
    timestamptz '2024-01-01 20:00+00' + g * interval '1 hour', timestamptz '2024-01-01 20:00+00' + g * interval '1 hour',
    g
FROM generate_series(1, 24) g
"""


@pytest.fixture()
def loaded(src_url, dst_url):
    citext = run_sql(dst_url, "SELECT count(*) FROM pg_available_extensions WHERE name = 'citext'")[0][0] == 1
    if citext:
        run_sql(dst_url, "CREATE EXTENSION citext")
    run_sql(src_url, SOURCE)
    run_sql(src_url, FILL)
    run_sql(dst_url, DEST_TYPES)
    run_sql(dst_url, DEST.format(name_type="citext" if citext else "text"))
    spec = table_spec(
        src_url,
        dst_url,
        "ev",
        time_column="at",
        timezone="Asia/Kolkata",
        conflict_policy="backfill_wins",
        allow_lossy_casts=["seen_day"],  # timestamptz -> date drops the time of day, on purpose
        validation={"sum_columns": ["amt", "n"]},
    )
    for chunk in plan_chunks("2024-01-01", "2024-01-04", "day", spec.timezone):
        transfer_chunk(spec, chunk)
    same = "SELECT id, mood::text, tags::text, email, amt::text, name::text, seen::text, seen_day::text FROM ev ORDER BY id"
    # the chunk path loaded what the source says, cast in the spec's timezone (the premise of this test)
    src_rows = run_sql(
        src_url,
        "SELECT id, mood, tags::text, email, amt::numeric(12,2)::text, name, seen::timestamp::text,"
        " seen_day::date::text FROM ev ORDER BY id",
        setup="SET TimeZone = 'Asia/Kolkata'",
    )
    assert run_sql(dst_url, same) == src_rows
    return spec, dst_url, citext


def test_equal_data_passes_with_destination_only_types(loaded):
    spec, _, _ = loaded
    report = validate_range(spec, "2024-01-01", "2024-01-04", store=False)
    assert report.status == PASS, report.format_table()
    assert [d.day.isoformat() for d in report.days] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert all(d.checksum is not None and not d.checksum_differs for d in report.days)
    assert sum(d.destination_rows for d in report.days) == 24
    amt = sum(d.sums["amt"][1] for d in report.days)
    assert amt == sum(round(g * 1.25, 2) for g in range(1, 25)) or str(amt) == "375.00"


@pytest.mark.parametrize(
    "change",
    [
        "mood = 'ok'::mood WHERE id = {id} AND mood <> 'ok'",
        "tags = ARRAY['ok'::mood] WHERE id = {id}",
        "email = 'x' || email WHERE id = {id}",
        "seen = seen + interval '1 hour' WHERE id = {id}",
        "seen_day = seen_day + 1 WHERE id = {id}",
        # citext: '=' says equal (case only), the value changed
        "name = CASE WHEN name::text = 'Abc' THEN 'ABC' ELSE 'äöü' END WHERE id = {id}",
    ],
    ids=["enum", "enum_array", "text_domain", "timestamp", "date", "case_only"],
)
def test_one_changed_value_fails_naming_its_day(loaded, change):
    spec, dst, citext = loaded
    # a row of 2024-01-02 in Asia/Kolkata
    target = run_sql(
        dst,
        "SELECT id FROM ev WHERE at >= '2024-01-02 00:00+05:30' AND at < '2024-01-03 00:00+05:30'"
        " AND mood <> 'ok' ORDER BY id LIMIT 1",
    )[0][0]
    conn = psycopg2.connect(dst)
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE ev SET " + change.format(id=int(target)))  # constants of this test
        assert cur.rowcount == 1
    conn.close()
    report = validate_range(spec, "2024-01-01", "2024-01-04", store=False)
    assert report.status == FAIL, report.format_table()
    bad = [d for d in report.days if d.status != PASS]
    assert [d.day.isoformat() for d in bad] == ["2024-01-02"], report.format_table()
    assert bad[0].checksum_differs


def test_a_changed_domain_sum_fails_naming_its_day(loaded):
    spec, dst, _ = loaded
    run_sql(
        dst,
        "UPDATE ev SET amt = amt + 1 WHERE id = (SELECT min(id) FROM ev WHERE at >= '2024-01-03 00:00+05:30')",
    )
    report = validate_range(spec, "2024-01-01", "2024-01-04", store=False)
    bad = [d for d in report.days if d.status != PASS]
    assert [d.day.isoformat() for d in bad] == ["2024-01-03"], report.format_table()
    assert bad[0].diffs["sum(amt)"] > 0 and bad[0].worst_metric == "sum(amt)"


def test_a_value_cut_to_a_varchar_length_fails_its_day(src_url, dst_url):
    """Validation does not cast the source to varchar(n) (an explicit cast cuts silently): a destination
    value cut by some other loader differs from its source."""
    run_sql(src_url, "CREATE TABLE ev (id int PRIMARY KEY, at timestamptz NOT NULL, s text, b varbit)")
    run_sql(dst_url, "CREATE TABLE ev (id int PRIMARY KEY, at timestamptz NOT NULL, s varchar(5), b bit varying(3))")
    run_sql(
        src_url,
        "INSERT INTO ev VALUES (1, '2024-01-01 10:00Z', 'abcdefg', '101'), (2, '2024-01-02 10:00Z', 'ab', '1011')",
    )
    run_sql(
        dst_url, "INSERT INTO ev VALUES (1, '2024-01-01 10:00Z', 'abcde', '101'), (2, '2024-01-02 10:00Z', 'ab', '101')"
    )
    spec = table_spec(src_url, dst_url, "ev", time_column="at")
    report = validate_range(spec, "2024-01-01", "2024-01-03", store=False)
    assert [(d.day.isoformat(), d.status) for d in report.days] == [("2024-01-01", FAIL), ("2024-01-02", FAIL)]


def test_a_money_sum_column_is_compared_as_a_number(src_url, dst_url):
    """sum(money) reads as text ('$3.50'); validation sums it as numeric, across month segments too."""
    for url in (src_url, dst_url):
        run_sql(url, "CREATE TABLE ev (id int PRIMARY KEY, at timestamptz NOT NULL, m money)")
    rows = "(1, '2024-01-31 10:00Z', 1234.5), (2, '2024-02-01 10:00Z', 2), (3, '2024-02-01 11:00Z', 0.25)"
    run_sql(src_url, f"INSERT INTO ev VALUES {rows}")  # constants of this test
    run_sql(dst_url, f"INSERT INTO ev VALUES {rows}")
    run_sql(dst_url, "UPDATE ev SET m = m + 0.1::money WHERE id = 3")
    spec = table_spec(src_url, dst_url, "ev", time_column="at", validation={"sum_columns": ["m"], "checksum": "off"})
    report = validate_range(spec, "2024-01-31", "2024-02-02", store=False)
    assert [(d.day.isoformat(), d.status) for d in report.days] == [("2024-01-31", PASS), ("2024-02-01", FAIL)]
    assert [str(x) for x in report.days[1].sums["m"]] == ["2.25", "2.35"]
