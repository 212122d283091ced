"""Time chunks vs auto-sized chunks vs key ranges on a time-scattered table (docs/chunking.md).

One command:  PYTHONPATH=. python -m benchmarks.chunking_scatter [--rows 1000000]

Seeds an orders table whose ids follow the physical order and whose created_at is random over two years
(pg_stats.correlation of created_at near 0), plans it five ways with the provider's own planner, runs every
chunk through ``transfer_chunk`` one after another (the chunk path without Airflow), and prints per way:
chunks, rows, wall time, rows/s, and the heap pages one chunk reads (EXPLAIN (ANALYZE, BUFFERS) of the
middle chunk's SELECT: shared buffers hit + read). Also prints the plan's notes (what it chose and why, and its advice).
"""

from __future__ import annotations

import argparse
import os
import time

import psycopg2
from psycopg2 import sql

from airflow_backfill_provider.plan import keyranges
from airflow_backfill_provider.core import sql as q
from tests.seed import create_orders
from airflow_backfill_provider.plan.planning import build_plan
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from benchmarks.seed import Databases

START, END = "2023-01-01", "2025-01-01"


def seed(url: str, rows: int) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            """CREATE TABLE orders (id bigint, customer_id integer NOT NULL, status text NOT NULL,
                 amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
                 note text)"""
        )
        cur.execute(
            """INSERT INTO orders SELECT g, (g * 7919) %% 50000, (ARRAY['new','paid','shipped','refunded'])[1 + g %% 4],
                   ((g * 37) %% 100000) / 100.0, t, t + (g %% 3600) * interval '1 second',
                   'order ' || g || ': ' || repeat(md5(g::text), 2)
               FROM (SELECT g, %(start)s::timestamptz + random() * interval '731 days' AS t
                     FROM generate_series(1::bigint, %(rows)s) g) s""",
            {"start": START, "rows": rows},
        )
        cur.execute("ALTER TABLE orders ADD PRIMARY KEY (id)")
        cur.execute("CREATE INDEX ON orders (created_at)")
        cur.execute("VACUUM ANALYZE orders")  # VACUUM: needs autocommit
    conn.close()


def pages_of_chunk(src_url: str, spec, chunk) -> int:
    # every column, as a chunk reads them (a constant would let an index-only scan skip the heap)
    select = q.chunk_select(spec.source, [sql.SQL("*")], spec.time_column, chunk.start, chunk.end)
    if chunk.keyed:
        select = select + keyranges.key_filter(chunk)
    with psycopg2.connect(src_url) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}").format(select))
        plan = cur.fetchone()[0][0]["Plan"]
    return int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


def run_way(label, src_url, dst_url, **spec_kw) -> dict:
    spec = load_spec(
        dict(
            name="bench",
            source_conn_id=src_url,
            destination_conn_id=dst_url,
            source_table="orders",
            destination_table="orders",
            time_column="created_at",
            key_columns=["id"],
            version_column="updated_at",
            watermark={"enabled": False},
            **spec_kw,
        )
    )
    with psycopg2.connect(dst_url) as d:
        d.autocommit = True
        d.cursor().execute("TRUNCATE orders; DROP TABLE IF EXISTS backfill_ledger")
    s, d = psycopg2.connect(src_url), psycopg2.connect(dst_url)
    try:
        plan = build_plan(spec, START, END, src_conn=s, dst_conn=d)
    finally:
        s.close()
        d.close()
    pages = pages_of_chunk(src_url, spec, plan.chunks[len(plan.chunks) // 2])  # a middle one: whole period
    t0 = time.monotonic()
    rows = sum(transfer_chunk(spec, c).rows_extracted for c in plan.chunks)
    wall = time.monotonic() - t0
    return {
        "way": label,
        "chunks": len(plan.chunks),
        "rows": rows,
        "wall_s": wall,
        "rows_per_s": rows / wall,
        "pages_per_chunk": pages,
        "notes": plan.notes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument(
        "--admin-url", default=os.environ.get("BACKFILL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    args = ap.parse_args(argv)
    dbs = Databases(args.admin_url)
    src, dst = dbs.create()
    try:
        seed(src, args.rows)
        with psycopg2.connect(dst) as conn:
            create_orders(conn)
        with psycopg2.connect(src) as conn, conn.cursor() as cur:
            cur.execute("SELECT relpages FROM pg_class WHERE oid = 'orders'::regclass")
            table_pages = cur.fetchone()[0]
            cur.execute(
                "SELECT attname, round(correlation::numeric, 3) FROM pg_stats WHERE tablename = 'orders'"
                " AND attname IN ('id', 'created_at') ORDER BY 1"
            )
            corr = dict(cur.fetchall())
        print(f"source: {args.rows:,} rows, {table_pages:,} pages; pg_stats.correlation {corr}")
        results = [
            run_way("time, month", src, dst, granularity="month"),
            run_way("time, week", src, dst, granularity="week"),
            run_way("time, auto (200k)", src, dst, granularity="auto", target_chunk_rows=200_000),
            run_way("key ranges (200k)", src, dst, chunk_by="key", target_chunk_rows=200_000),
            # as many chunks as weekly time chunks: the per-chunk cost of the physical order shows here
            run_way("key ranges (10k)", src, dst, chunk_by="key", target_chunk_rows=10_000),
        ]
        print(f"\n{'way':<20} {'chunks':>6} {'rows':>10} {'wall s':>8} {'rows/s':>9} {'pages/chunk':>12}")
        for r in results:
            print(
                f"{r['way']:<20} {r['chunks']:>6} {r['rows']:>10,} {r['wall_s']:>8.1f} {r['rows_per_s']:>9,.0f} "
                f"{r['pages_per_chunk']:>12,}"
            )
        for r in results:
            for note in r["notes"]:
                print(f"  [{r['way']}] {note}")
    finally:
        dbs.drop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
