"""The cast-failure finder re-reads the chunk's own rows: same bound rule as the chunk (core/timebounds.py)."""

from __future__ import annotations

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.specs import table_spec


@pytest.mark.parametrize("kind, value", [("date", "2024-01-01"), ("timestamp", "2024-01-01 02:00")])
def test_a_bad_value_on_a_new_york_day_is_named_with_the_source_in_utc(src_url, dst_url, pg, kind, value):
    admin = pg(src_url)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("ALTER DATABASE {} SET timezone = 'UTC'").format(sql.Identifier(src_url.rsplit("/", 1)[1])))
    conn = psycopg2.connect(src_url)  # a new session: the database's TimeZone applies
    with conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE ev (id bigint PRIMARY KEY, t {} NOT NULL, amount text)").format(sql.SQL(kind))
        )
        # 2024-01-01 (New York) has one bad amount; 2024-01-02 is clean
        cur.execute(
            "INSERT INTO ev VALUES (1, %s, '1.50'), (2, %s, '12,50'), (3, %s::date + 1, '2')", (value, value, value)
        )
    conn.close()
    with pg(dst_url).cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE ev (id bigint PRIMARY KEY, t {} NOT NULL, amount numeric)").format(sql.SQL(kind))
        )
    spec = table_spec(src_url, dst_url, "ev", time_column="t", timezone="America/New_York")
    first, second = plan_chunks("2024-01-01", "2024-01-03", "day", spec.timezone)
    with pytest.raises(
        PermanentChunkError, match=r"chunk 2024-01-01: column 'amount' cannot take value '12,50'.*\(id\)=\(2\)"
    ):
        transfer_chunk(spec, first)
    assert transfer_chunk(spec, second).rows_extracted == 1


def test_a_domain_and_a_historical_expression_are_filtered_by_their_date_type(src_url, dst_url, pg):
    """The time column's type is asked from the source when the catalog row does not say it plainly."""
    admin = pg(src_url)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("ALTER DATABASE {} SET timezone = 'UTC'").format(sql.Identifier(src_url.rsplit("/", 1)[1])))
    conn = psycopg2.connect(src_url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "CREATE DOMAIN day_d AS date; CREATE TABLE ev (id bigint PRIMARY KEY, t day_d NOT NULL, amount text)"
        )
        cur.execute("INSERT INTO ev SELECT g, date '2024-01-01' + g % 4, '1' FROM generate_series(1, 40) g")
        # an older table whose day is text: read through a historical expression
        cur.execute("CREATE TABLE ev_old (id bigint PRIMARY KEY, day_text text NOT NULL, amount text)")
        cur.execute("INSERT INTO ev_old SELECT 100 + g, '2023-12-' || (28 + g % 4), '1' FROM generate_series(1, 40) g")
    conn.close()
    with pg(dst_url).cursor() as cur:
        cur.execute("CREATE TABLE ev (id bigint PRIMARY KEY, t date NOT NULL, amount numeric)")
    spec = table_spec(
        src_url,
        dst_url,
        "ev",
        time_column="t",
        timezone="America/New_York",
        historical=[{"until": "2024-01-01", "source_table": "ev_old", "column_expressions": {"t": "day_text::date"}}],
    )
    loaded = {
        c.chunk_id: transfer_chunk(spec, c).rows_extracted
        for c in plan_chunks("2023-12-28", "2024-01-05", "day", spec.timezone)
    }
    assert loaded == {
        f"{d}": 10
        for d in [
            "2023-12-28",
            "2023-12-29",
            "2023-12-30",
            "2023-12-31",
            "2024-01-01",
            "2024-01-02",
            "2024-01-03",
            "2024-01-04",
        ]
    }
