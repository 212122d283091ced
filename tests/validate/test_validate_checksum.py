"""Validation's row checksum, by type (PostgreSQL 14+) and by text: the same verdicts, on real PostgreSQL.

The typed checksum (``hash_record_extended`` over the values, text byte by byte) costs about half the CPU
of hashing each row's text; it must catch every changed value the text checksum catches.
"""

from __future__ import annotations

import psycopg2
import pytest

from airflow_backfill_provider import validate
from airflow_backfill_provider.validate import FAIL, PASS, validate_range
from tests.conftest import fetch_all
from tests.specs import table_spec

TABLE = """
CREATE TABLE t (
    id bigint PRIMARY KEY, at timestamptz NOT NULL, n integer, amount numeric(12,2), ratio double precision,
    day date, clock time, flag boolean, code char(3), label varchar(20), note text, doc jsonb, u uuid,
    raw bytea, tags text[], spot point
);
INSERT INTO t
SELECT g, timestamptz '2024-01-01 00:00+00' + g * interval '2 hours', g, g * 1.25, g / 3.0,
       date '2024-01-01' + g % 3, time '10:00' + g * interval '1 minute', g % 2 = 0, 'c' || g % 10,
       'label ' || g, 'note ' || g, jsonb_build_object('g', g), md5(g::text)::uuid, decode(md5(g::text), 'hex'),
       ARRAY['a' || g, 'b'], point(g, g)
FROM generate_series(1, 30) g
"""

# one changed value per type, in a row of 2024-01-02 (UTC): the checksum alone must see it
CHANGES = {
    "integer": "n = n + 1",
    "numeric": "amount = amount + 0.01",
    "float": "ratio = ratio * 1.0000001",
    "date": "day = day + 1",
    "time": "clock = clock + interval '1 second'",
    "boolean": "flag = NOT flag",
    "char": "code = 'zzz'",
    "varchar case": "label = upper(label)",
    "text": "note = note || ' '",
    "jsonb": "doc = doc || '{\"x\": 1}'",
    "uuid": "u = md5('other')::uuid",
    "bytea": "raw = raw || '\\x00'::bytea",
    "array (as text)": "tags = ARRAY['A' || id, 'b']",
    "point (as text)": "spot = point(0, 0)",
}

SUMS = {"sum_columns": ["amount"]}


@pytest.fixture(params=["typed", "text"])
def method(request, monkeypatch):
    monkeypatch.setattr(validate, "checksum_method", lambda *_: request.param)
    return request.param


@pytest.fixture()
def tables(src_url, dst_url, pg):
    for url in (src_url, dst_url):
        with pg(url).cursor() as cur:
            cur.execute(TABLE)
    return src_url, dst_url


def _validate(src, dst):
    spec = table_spec(src, dst, "t", time_column="at", validation=SUMS)
    return validate_range(spec, "2024-01-01", "2024-01-05", source=src, destination=dst, store=False)


def test_this_server_uses_the_typed_checksum(src_url, dst_url):
    s, d = psycopg2.connect(src_url), psycopg2.connect(dst_url)
    try:
        assert validate.checksum_method(s, d) == ("typed" if s.server_version >= 140000 else "text")
    finally:
        s.close()
        d.close()


def test_identical_tables_pass(tables, method):
    report = _validate(*tables)
    assert report.status == PASS, report.format_table()


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_one_changed_value_fails_its_day(tables, method, change):
    src, dst = tables
    (target,) = fetch_all(dst, "SELECT min(id) FROM t WHERE at >= '2024-01-02' AND at < '2024-01-03'")[0]
    conn = psycopg2.connect(dst)
    with conn, conn.cursor() as cur:
        cur.execute(f"UPDATE t SET {CHANGES[change]} WHERE id = %s", (target,))  # constants of this test
        assert cur.rowcount == 1
    conn.close()
    report = _validate(src, dst)
    bad = [d for d in report.days if d.status != PASS]
    assert report.status == FAIL and [d.day.isoformat() for d in bad] == ["2024-01-02"], report.format_table()
    assert bad[0].checksum_differs


def test_a_case_only_change_under_a_case_insensitive_collation_fails(tables, pg, method):
    """Hashed under the column's own nondeterministic collation, 'abc' and 'ABC' would hash alike."""
    src, dst = tables
    for url in (src, dst):
        with pg(url).cursor() as cur:
            try:
                cur.execute("CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
            except psycopg2.errors.FeatureNotSupported:
                pytest.skip("this server has no ICU collations")
            cur.execute('ALTER TABLE t ALTER COLUMN note TYPE text COLLATE "ci"')
    assert _validate(src, dst).status == PASS
    with pg(dst).cursor() as cur:
        cur.execute("UPDATE t SET note = upper(note) WHERE id = 13")  # 2024-01-02 02:00 UTC
    report = _validate(src, dst)
    assert [d.day.isoformat() for d in report.days if d.status != PASS] == ["2024-01-02"], report.format_table()
