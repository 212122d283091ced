"""Throwaway benchmark databases and a seeded ``orders`` source table.

Seeding runs server-side (one ``INSERT ... SELECT FROM generate_series``), so 2M rows take seconds and no
rows cross the wire. Rows are spread evenly over ``days`` days, so a time range holds a predictable
number of rows; ``updated_at`` is ``created_at`` plus up to 3 days, like orders that change after creation.
"""

from __future__ import annotations

import datetime as dt
import uuid

import psycopg2
from psycopg2 import sql

#: the source table's columns, in order; the destination has the same shape
COLUMNS = ("id", "customer_id", "status", "amount", "created_at", "updated_at", "note")
KEY = "id"
TIME_COLUMN = "created_at"
VERSION_COLUMN = "updated_at"
DEFAULT_START = dt.datetime(2023, 1, 1, tzinfo=dt.timezone.utc)


def admin_connect(admin_url: str):
    conn = psycopg2.connect(admin_url, connect_timeout=5)
    conn.autocommit = True
    return conn


def db_url(admin_url: str, dbname: str) -> str:
    """The admin URL with its database swapped (query string kept)."""
    base, sep, query = admin_url.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{dbname}{sep}{query}"


class Databases:
    """Source and destination databases with a random suffix; :meth:`drop` removes both."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        tag = uuid.uuid4().hex[:10]
        self.names = {"src": f"bench_src_{tag}", "dst": f"bench_dst_{tag}"}
        self._created: list[str] = []

    def create(self) -> tuple[str, str]:
        admin = admin_connect(self.admin_url)
        try:
            with admin.cursor() as cur:
                for name in self.names.values():
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    self._created.append(name)
        finally:
            admin.close()
        return self.url("src"), self.url("dst")

    def url(self, which: str) -> str:
        return db_url(self.admin_url, self.names[which])

    def drop(self) -> None:
        if not self._created:
            return
        admin = admin_connect(self.admin_url)
        try:
            with admin.cursor() as cur:
                for name in self._created:
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (name,),
                    )
                    cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            self._created.clear()
        finally:
            admin.close()


def create_orders_table(cur, table: str = "orders", *, with_keys: bool = True) -> None:
    """The ``orders`` shape. Keys and the time index are added after a bulk seed (faster)."""
    cur.execute(
        sql.SQL(
            """
            CREATE TABLE {t} (
                id          bigint        NOT NULL,
                customer_id bigint        NOT NULL,
                status      text          NOT NULL,
                amount      numeric(12,2) NOT NULL,
                created_at  timestamptz   NOT NULL,
                updated_at  timestamptz   NOT NULL,
                note        text
            )"""
        ).format(t=sql.Identifier(table))
    )
    if with_keys:
        add_keys(cur, table)


def add_keys(cur, table: str) -> None:
    """Primary key on ``id`` and an index on ``created_at``: what a live orders table has on both sides."""
    cur.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(sql.Identifier(table)))
    cur.execute(
        sql.SQL("CREATE INDEX {} ON {} (created_at)").format(
            sql.Identifier(f"{table}_created_at_idx"), sql.Identifier(table)
        )
    )


def seed_orders(src_url: str, rows: int, days: int, start: dt.datetime = DEFAULT_START, table: str = "orders") -> None:
    """Fill the source table with ``rows`` rows evenly over ``[start, start + days)``."""
    conn = psycopg2.connect(src_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            create_orders_table(cur, table, with_keys=False)
            cur.execute(
                sql.SQL(
                    """
                    INSERT INTO {t}
                    SELECT i,
                           1 + (i * 7919) %% 50000,
                           (ARRAY['new','paid','shipped','delivered','cancelled'])[1 + i %% 5],
                           ((i * 37) %% 100000) / 100.0,
                           %(start)s::timestamptz + (i - 1) * (%(days)s * interval '1 day' / %(rows)s),
                           %(start)s::timestamptz + (i - 1) * (%(days)s * interval '1 day' / %(rows)s)
                               + (i %% 72) * interval '1 hour',
                           CASE WHEN i %% 10 = 0 THEN NULL ELSE 'order note ' || md5(i::text) END
                    FROM generate_series(1, %(rows)s::bigint) AS i"""
                ).format(t=sql.Identifier(table)),
                {"start": start, "days": days, "rows": rows},
            )
            add_keys(cur, table)
            cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
    finally:
        conn.close()


def time_at_row(src_url: str, offset: int, table: str = "orders"):
    """``created_at`` of the row after the first ``offset`` rows (None past the end): a chunk of N rows ends there."""
    conn = psycopg2.connect(src_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT created_at FROM {} ORDER BY created_at OFFSET %s LIMIT 1").format(
                    sql.Identifier(table)
                ),
                (offset,),
            )
            row = cur.fetchone()
        return row[0] if row else None
    finally:
        conn.close()
