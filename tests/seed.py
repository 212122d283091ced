"""Demo and test data: an ``orders`` table like a production one, seeded server-side (fast, no rows in Python).

Used by ``make demo`` (scripts/demo.py) and the tests, so they load the same shape. Not part of the installed
package: seed data has no place in a provider's runtime.
"""

from __future__ import annotations

import datetime as dt

from psycopg2 import sql

#: the spec of a backfill of ``orders`` into ``public.orders`` (load_spec it with the connections)
ORDERS_SPEC = dict(
    name="orders",
    source_table="orders",
    destination_table="public.orders",
    time_column="created_at",
    key_columns=["id"],
    version_column="updated_at",
)

ORDERS_DDL = """
CREATE TABLE IF NOT EXISTS {t} (
    id          bigint PRIMARY KEY,
    customer_id integer NOT NULL,
    status      text NOT NULL,
    amount      numeric(12,2) NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    note        text
)
"""


def create_orders(conn, table: str = "orders") -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL(ORDERS_DDL).format(t=sql.Identifier(table)))
    conn.commit()


def seed_orders(
    conn, *, rows: int, days: int, start: dt.date = dt.date(2023, 1, 1), table: str = "orders", first_id: int = 1
) -> None:
    """``rows`` orders spread evenly over ``days`` days from ``start`` (UTC), ids from ``first_id``."""
    create_orders(conn, table)
    span_s = days * 86400
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                """INSERT INTO {t} (id, customer_id, status, amount, created_at, updated_at, note)
                   SELECT g, (g * 7919) %% 50000, (ARRAY['new','paid','shipped','refunded'])[1 + g %% 4],
                          ((g * 37) %% 100000) / 100.0,
                          %(start)s::timestamptz + ((g - %(first)s)::double precision * %(span)s / %(rows)s) * interval '1 second',
                          %(start)s::timestamptz + ((g - %(first)s)::double precision * %(span)s / %(rows)s) * interval '1 second'
                              + (g %% 3600) * interval '1 second',
                          CASE WHEN g %% 10 = 0 THEN 'gift' END
                   FROM generate_series(%(first)s::bigint, %(first)s::bigint + %(rows)s - 1) g"""
            ).format(t=sql.Identifier(table)),
            {
                "start": dt.datetime.combine(start, dt.time(), dt.timezone.utc),
                "span": span_s,
                "rows": rows,
                "first": first_id,
            },
        )
        # like production: chunks select by time range, so the time column is indexed
        cur.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (created_at)").format(
                i=sql.Identifier(f"{table}_created_at_idx"), t=sql.Identifier(table)
            )
        )
        cur.execute(sql.SQL("ANALYZE {t}").format(t=sql.Identifier(table)))
    conn.commit()
