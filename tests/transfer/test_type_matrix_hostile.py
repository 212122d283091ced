"""The type matrix under hostile database-level defaults on source and destination (corr brief, gap 2).

A representative subset of tests/transfer/test_type_matrix.py (numeric, float4/8, money, interval, timestamp/tz,
date, time/timetz, bytea, json/jsonb, arrays with NULL elements, xml, text with non-ASCII, enum arrays and
destination-only types) is loaded in both copy formats between databases whose defaults differ from each
other and from PostgreSQL's: DateStyle, IntervalStyle, TimeZone, extra_float_digits, bytea_output,
quote_all_identifiers, standard_conforming_strings off, default_transaction_isolation serializable, lc_monetary (another locale than C when the server has one: ``C.utf8`` at least on
Debian; a locale with another currency format is not installed on the development machine), and two settings that change how values are *read*: ``array_nulls = off`` (an unquoted NULL
array element would become the string 'NULL') and ``xmloption = document`` (an XML content fragment would
be refused). Values must round-trip exactly and a rerun must rewrite nothing. The comparison reads both
sides under one neutral set of settings.
"""

from __future__ import annotations

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.transfer.chunk import transfer_chunk
from airflow_backfill_provider.validate import PASS, validate_range
from tests.session_helpers import run_sql, set_database_defaults
from tests.transfer.test_type_matrix import (
    CHUNK,
    DEST_ONLY,
    SAME,
    TYPES_BOTH,
    TYPES_DEST_ONLY,
    TYPES_SOURCE_ONLY,
    _table,
)
from tests.specs import table_spec

SUBSET = [
    "num4", "num", "mny", "f4", "f8", "f8b", "txt", "ch", "bya", "d", "tm", "ttz", "ts", "tstz", "iv",
    "js", "jb", "ai", "at2", "an", "ena", "x", "b4a",
]  # fmt: skip
COLUMNS = [c for c in SAME if c[0] in SUBSET]


def _columns() -> list:
    """COLUMNS without xml on a server built without libxml (the PostgreSQL 18 wheel scripts/pg.sh may start)."""
    import psycopg2

    from tests.transfer.test_type_matrix import same_columns

    conn = psycopg2.connect(_admin_url())
    conn.autocommit = True
    try:
        names = {c for c, _, _ in same_columns(conn)}
    finally:
        conn.close()
    return [c for c in COLUMNS if c[0] in names]


def _locales() -> list[str]:
    """lc_monetary values this server accepts, other than C (the provider's pin)."""
    rows = run_sql(_admin_url(), "SELECT collname FROM pg_collation WHERE collprovider = 'c' ORDER BY 1")
    return [r[0] for r in rows if r[0] not in ("C", "POSIX", "default", "ucs_basic")]


def _admin_url() -> str:
    from tests.conftest import ADMIN_URL

    return ADMIN_URL


def hostile(other_locale: str | None, **extra: str) -> dict[str, str]:
    out = {
        "datestyle": "SQL, DMY",
        "intervalstyle": "sql_standard",
        "extra_float_digits": "-3",
        "bytea_output": "escape",
        "array_nulls": "off",
        "xmloption": "document",
        "quote_all_identifiers": "on",
        "standard_conforming_strings": "off",  # backslashes in string literals are escapes
        "default_transaction_isolation": "serializable",
        **extra,
    }
    if other_locale:
        out["lc_monetary"] = other_locale
    return out


NEUTRAL = (
    "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC'; SET extra_float_digits = 3;"
    " SET bytea_output = 'hex'; SET lc_monetary = 'C'"
)


def as_text(url, table, columns):
    query = sql.SQL("SELECT {cols} FROM {t} ORDER BY id").format(
        cols=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns),
        t=sql.Identifier(table),
    )
    return run_sql(url, query, setup=NEUTRAL)


@pytest.fixture(scope="module")
def hostile_dbs(databases):
    src, dst = databases.create("hsrc"), databases.create("hdst")
    dest_only = DEST_ONLY
    columns = _columns()
    run_sql(src, TYPES_BOTH + TYPES_SOURCE_ONLY)
    run_sql(dst, TYPES_BOTH + TYPES_DEST_ONLY)
    run_sql(src, _table("matrix", [(c, t) for c, t, _ in columns] + [(c, s) for c, s, _, _ in dest_only]))
    conn = psycopg2.connect(src)
    with conn, conn.cursor() as cur:
        cur.execute(NEUTRAL)
        for row in (1, 2, 3):
            cols = [(c, t, v[row - 1]) for c, t, v in columns] + [(c, s, v[row - 1]) for c, s, _, v in dest_only]
            cur.execute(
                sql.SQL("INSERT INTO matrix (id, at, updated_at, {cols}) VALUES (%s, %s, %s, {vals})").format(
                    cols=sql.SQL(", ").join(sql.Identifier(c) for c, _, _ in cols),
                    vals=sql.SQL(", ").join(sql.SQL("%s::{t}").format(t=sql.SQL(t)) for _, t, _ in cols),
                ),
                [row, f"2024-01-01 0{row}:00+00", "2024-01-01 00:00+00", *[v for _, _, v in cols]],
            )
        # a text array element that is the string 'NULL', next to a real NULL: both must stay what they are
        cur.execute(
            "INSERT INTO matrix (id, at, updated_at, at2) VALUES (4, '2024-01-01 04:00+00', '2024-01-01 00:00+00',"
            " ARRAY['NULL', NULL])"
        )
    conn.close()
    others = _locales()
    # different hostile defaults on each side: whatever one side writes, the other must read the same value
    set_database_defaults(src, **hostile(others[0] if others else None, timezone="Pacific/Chatham"))
    set_database_defaults(
        dst, **hostile(others[-1] if others else None, timezone="America/St_Johns", datestyle="German, DMY")
    )
    return src, dst, [(c, d) for c, _, d, _ in dest_only], others


@pytest.mark.parametrize("copy_format", ["binary", "text"])
def test_types_round_trip_exactly_under_hostile_defaults(hostile_dbs, copy_format):
    src, dst, dest_only, _ = hostile_dbs
    target = f"h_{copy_format}"
    columns = ["id", "at", "updated_at", *[c for c, _, _ in _columns()], *[c for c, _ in dest_only]]
    run_sql(
        src,
        sql.SQL("CREATE TABLE {t} (LIKE matrix INCLUDING ALL); INSERT INTO {t} SELECT * FROM matrix").format(
            t=sql.Identifier(target)
        ),
    )
    run_sql(dst, _table(target, [(c, t) for c, t, _ in _columns()] + dest_only))
    spec = table_spec(
        src,
        dst,
        target,
        time_column="at",
        version_column="updated_at",
        name="hostile",
        copy_format=copy_format,
        timezone="Asia/Kolkata",
    )
    first = transfer_chunk(spec, CHUNK)
    assert (first.rows_extracted, first.inserted) == (4, 4)
    assert as_text(dst, target, columns) == as_text(src, target, columns)
    assert run_sql(
        dst, sql.SQL("SELECT at2[1], at2[2] IS NULL FROM {} WHERE id = 4").format(sql.Identifier(target))
    ) == [("NULL", True)]
    again = transfer_chunk(spec, CHUNK)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 4)
    report = validate_range(spec, "2024-01-01", "2024-01-02", store=False)
    assert report.status == PASS, report.format_table()


def test_sessions_pin_the_settings_that_read_values(hostile_dbs):
    """lc_monetary, array_nulls, xmloption, bytea_output: pinned on every session, whatever the database says."""
    from airflow_backfill_provider.connections import connect

    _, dst, _, _ = hostile_dbs
    conn = connect(dst, application_name="backfill:test:pins")
    try:
        with conn.cursor() as cur:
            got = []
            for name in ("lc_monetary", "array_nulls", "xmloption", "bytea_output"):
                cur.execute(sql.SQL("SHOW {}").format(sql.Identifier(name)))
                got.append(cur.fetchone()[0])
            cur.execute("SELECT 1234.5::money::text")
            money = cur.fetchone()[0]
    finally:
        conn.close()
    assert got == ["C", "on", "content", "hex"]
    assert money == "$1,234.50"
