"""Destination bookkeeping around a measurement: fresh tables, a level field, and rows rewritten.

Nothing here is timed. "Rows rewritten" is counted two ways that must agree: the rows whose ``xmin``
is newer than a marker transaction taken just before the run (exact, per row), and the delta of
``pg_stat_user_tables.n_tup_upd`` (what a DBA would look at).
"""

from __future__ import annotations

import time

import psycopg2
from psycopg2 import sql

from benchmarks.seed import create_orders_table


def _conn(url: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def fresh_table(dst_url: str, table: str = "orders", ledger: str = "backfill_ledger") -> None:
    """Drop and recreate the destination table (and our ledger): every first load starts from nothing."""
    conn = _conn(dst_url)
    try:
        with conn.cursor() as cur:
            for name in (table, ledger):
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            create_orders_table(cur, table)
    finally:
        conn.close()


def level_field(dst_url: str, table: str | None = None) -> None:
    """VACUUM (sets hint bits, so autovacuum does not start mid-run) and CHECKPOINT (no checkpoint mid-run)."""
    conn = _conn(dst_url)
    try:
        with conn.cursor() as cur:
            if table:
                cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
            try:
                cur.execute("CHECKPOINT")
            except psycopg2.errors.InsufficientPrivilege:  # not a superuser: measurements are just noisier
                pass
    finally:
        conn.close()


def xid_marker(dst_url: str) -> int:
    """A 32-bit xid assigned now: rows written later have a younger ``xmin``."""
    conn = _conn(dst_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT (pg_current_xact_id()::text::bigint % 4294967296)")
            return cur.fetchone()[0]
    finally:
        conn.close()


def rows_written_since(dst_url: str, marker: int, table: str = "orders") -> int:
    """Rows whose current version was written by a transaction at or after ``marker`` (wraparound-safe)."""
    conn = _conn(dst_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE age(xmin) <= age(%s::text::xid)").format(sql.Identifier(table)),
                (str(marker),),
            )
            return cur.fetchone()[0]
    finally:
        conn.close()


def tuple_stats(dst_url: str, table: str = "orders", settle_s: float = 3.0) -> dict:
    """n_tup_ins/upd/del of the table, once the finished backends' stats have been flushed (stable twice)."""
    conn = _conn(dst_url)
    query = (
        "SELECT coalesce(n_tup_ins, 0), coalesce(n_tup_upd, 0), coalesce(n_tup_del, 0) "
        "FROM pg_stat_user_tables WHERE relid = to_regclass(%s)"
    )
    try:
        with conn.cursor() as cur:
            last = None
            deadline = time.monotonic() + settle_s
            while True:
                cur.execute("SELECT pg_stat_clear_snapshot()")
                cur.execute(query, (sql.Identifier(table).as_string(cur),))
                row = cur.fetchone() or (0, 0, 0)
                if row == last or time.monotonic() > deadline:
                    return {"ins": row[0], "upd": row[1], "del": row[2]}
                last = row
                time.sleep(0.3)
    finally:
        conn.close()


def fingerprint(url: str, table: str = "orders") -> tuple[int, int]:
    """(row count, order-independent hash of every row's text): equal means the same rows, same values."""
    conn = _conn(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0) FROM {} AS t").format(
                    sql.Identifier(table)
                )
            )
            return tuple(cur.fetchone())
    finally:
        conn.close()
