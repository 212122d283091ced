"""Validation catches the chunk path's own mistakes (issue 12, items 1 and "beyond the list").

Validation buckets days and tests range edges by the time column's own type, in SQL, without the
chunk filter's bound code (core/timebounds.py). Here the chunk filter is broken on purpose, back to the
old rule (timestamptz literals compared in the session TimeZone), and validation must FAIL and name
the day; and an altered value in one destination row must be named by the per-day checksum.
"""

from __future__ import annotations

import datetime as dt

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core import timebounds
from airflow_backfill_provider.core.chunks import plan_chunks, utc
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from airflow_backfill_provider.validate import FAIL, PASS, validate_range
from tests.session_helpers import set_database_defaults
from tests.specs import table_spec

TYPES = {"date": "date", "timestamp": "timestamp", "timestamptz": "timestamptz"}
FILL = {
    # five rows per date, 2023-12-30 .. 2024-01-06
    "date": "INSERT INTO ev SELECT g, date '2023-12-30' + g / 5, g % 7, 'n' || g FROM generate_series(0, 39) g",
    # one row per hour (naive wall time), same days
    "timestamp": "INSERT INTO ev SELECT g, timestamp '2023-12-30' + g * interval '1 hour', g % 7, 'n' || g"
    " FROM generate_series(0, 8 * 24 - 1) g",
    "timestamptz": "INSERT INTO ev SELECT g, timestamptz '2023-12-30 00:00+00' + g * interval '1 hour', g % 7,"
    " 'n' || g FROM generate_series(0, 8 * 24 - 1) g",
}
ZONE = "America/New_York"


def _setup(databases, kind: str):
    src, dst = databases.create("vtsrc"), databases.create("vtdst")
    # the setting: the source session reads in UTC, the spec's days are New York days
    set_database_defaults(src, timezone="UTC")
    set_database_defaults(dst, timezone="Asia/Kolkata")
    for url in (src, dst):
        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE TABLE ev (id bigint PRIMARY KEY, t {} NOT NULL, v integer, note text)").format(
                    sql.SQL(TYPES[kind])
                )
            )
            if url == src:
                cur.execute(FILL[kind])
        conn.close()
    spec = table_spec(src, dst, "ev", time_column="t", timezone=ZONE, validation={"sum_columns": ["v"]})
    return spec, src, dst


def _load(spec, start="2024-01-01", end="2024-01-04"):
    for chunk in plan_chunks(start, end, "day", spec.timezone):
        transfer_chunk(spec, chunk)


def _old_rule(kind, start, end, tz):
    """The bug of issue 12 item 1 as it read rows in a UTC session: the chunk's instants compared as UTC
    wall time, whatever the column (naive literals, so session pinning cannot mask it)."""
    return utc(start).replace(tzinfo=None), utc(end).replace(tzinfo=None)


@pytest.mark.parametrize("kind", ["date", "timestamp"])
def test_validation_fails_and_names_the_day_when_the_chunk_filter_reads_the_wrong_rows(databases, monkeypatch, kind):
    spec, _src, _dst = _setup(databases, kind)
    monkeypatch.setattr(timebounds, "bounds", _old_rule)
    _load(spec)
    monkeypatch.undo()
    report = validate_range(spec, "2024-01-01", "2024-01-04", store=False)
    assert report.status == FAIL
    failed = report.totals()["failed_days"]
    assert "2024-01-01" in failed, report.format_table()
    first = next(d for d in report.days if d.day == dt.date(2024, 1, 1))
    assert first.destination_rows < first.source_rows  # e.g. date: 0 of 5; timestamp: 19 of 24


@pytest.mark.parametrize("kind", list(TYPES))
def test_correct_chunks_pass_and_an_altered_value_is_named_by_the_checksum(databases, kind):
    spec, _src, dst = _setup(databases, kind)
    _load(spec)
    report = validate_range(spec, "2024-01-01", "2024-01-04", store=False)
    assert report.status == PASS, report.format_table()
    assert [d.day.isoformat() for d in report.days] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    # one destination row of 2024-01-02 (New York) gets another note: counts and sums still agree
    conn = psycopg2.connect(dst)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM ev ORDER BY t, id")
        ids = [r[0] for r in cur.fetchall()]
        where = {
            "date": "t = date '2024-01-02'",
            "timestamp": "t >= timestamp '2024-01-02 00:00' AND t < timestamp '2024-01-03 00:00'",
            "timestamptz": "t >= timestamptz '2024-01-02 00:00-05' AND t < timestamptz '2024-01-03 00:00-05'",
        }[kind]
        cur.execute(
            sql.SQL("UPDATE ev SET note = note || '!' WHERE id = (SELECT min(id) FROM ev WHERE {})").format(
                sql.SQL(where)
            )
        )
        assert cur.rowcount == 1 and ids
    conn.close()
    report = validate_range(spec, "2024-01-01", "2024-01-04", store=False)
    assert report.status == FAIL
    bad = [d for d in report.days if d.status != PASS]
    assert [d.day.isoformat() for d in bad] == ["2024-01-02"]
    assert bad[0].source_rows == bad[0].destination_rows and bad[0].diffs["sum(v)"] == 0
    assert bad[0].checksum_differs and bad[0].worst_metric == "checksum"
    assert report.totals()["checksum_days_differ"] == ["2024-01-02"]
    assert "DIFFERS" in report.format_table()
    # checksum: warn names the same day as a warning; off does not look
    warn = spec.model_copy(update={"validation": spec.validation.model_copy(update={"checksum": "warn"})})
    report = validate_range(warn, "2024-01-01", "2024-01-04", store=False)
    assert report.status == "warn" and report.totals()["checksum_days_differ"] == ["2024-01-02"]
    off = spec.model_copy(update={"validation": spec.validation.model_copy(update={"checksum": "off"})})
    assert validate_range(off, "2024-01-01", "2024-01-04", store=False).status == PASS


def test_checksum_does_not_depend_on_the_servers_text_settings(databases):
    """Source and destination databases with other TimeZone/DateStyle/IntervalStyle defaults still agree."""
    spec, src, dst = _setup(databases, "timestamptz")
    admin = psycopg2.connect(src)
    admin.autocommit = True
    with admin.cursor() as cur:
        name = sql.Identifier(dst.rsplit("/", 1)[1])
        cur.execute(sql.SQL("ALTER DATABASE {} SET DateStyle = 'SQL, DMY'").format(name))
        cur.execute(sql.SQL("ALTER DATABASE {} SET extra_float_digits = 0").format(name))
    admin.close()
    _load(spec)
    report = validate_range(spec, "2024-01-01", "2024-01-04", store=False)
    assert report.status == PASS, report.format_table()
    assert all(d.checksum is not None and not d.checksum_differs for d in report.days)
