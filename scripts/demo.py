"""make demo: a real backfill of a seeded 2-year `orders` table through the example DAG.

Steps: create source/destination databases on the local PostgreSQL, seed the source, set up an
Airflow home (metadata DB, connections via AIRFLOW_CONN_*, the source pool), run the example DAG with
`airflow dags test` over the whole range, then print chunks, rows and rows/s from the ledger and
compare source and destination.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
from psycopg2 import sql

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.seed import create_orders, seed_orders  # noqa: E402


def _exists(cur, table: str) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
    return cur.fetchone()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=730)
    ap.add_argument("--granularity", default="week", choices=["hour", "day", "week", "month"])
    ap.add_argument(
        "--pg", default=os.environ.get("BACKFILL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    args = ap.parse_args()

    def with_db(name: str) -> str:  # only the path: a socket server's ?host=/dir (or %2F host) is kept
        return urlunsplit(urlsplit(args.pg)._replace(path="/" + name))

    src_url, dst_url = with_db("backfill_demo_source"), with_db("backfill_demo_dest")
    admin = psycopg2.connect(args.pg)
    admin.autocommit = True
    with admin.cursor() as cur:
        for db in ("backfill_demo_source", "backfill_demo_dest"):
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    admin.close()

    t0 = time.monotonic()
    with psycopg2.connect(src_url) as conn:
        seed_orders(conn, rows=args.rows, days=args.days)
    with psycopg2.connect(dst_url) as conn:
        create_orders(conn)
    print(f"seeded source: {args.rows:,} orders over {args.days} days in {time.monotonic() - t0:.1f}s")

    home = REPO / ".demo" / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_BACKFILL_SOURCE_PG": src_url,
        "AIRFLOW_CONN_BACKFILL_DEST_PG": dst_url,
        "AIRFLOW_BACKFILL_STRICT": "1",
    }
    airflow = str(Path(sys.executable).with_name("airflow"))

    def run(*cmd: str, log: str) -> None:
        path = REPO / ".demo" / log
        with path.open("w") as fh:
            proc = subprocess.run([airflow, *cmd], env=env, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            print(path.read_text()[-4000:])
            raise SystemExit(f"`airflow {' '.join(cmd)}` failed (exit {proc.returncode}); full log: {path}")

    run("db", "migrate", log="db_migrate.log")
    run("pools", "set", "backfill_source", "4", "source slots for backfills", "--include-deferred", log="pool.log")
    print("airflow: metadata DB migrated, pool backfill_source (4 slots) created, connections set via AIRFLOW_CONN_*")

    start = "2023-01-01"
    end_day = time.strftime("%Y-%m-%d", time.gmtime(time.mktime((2023, 1, 1, 0, 0, 0, 0, 0, 0)) + args.days * 86400))
    conf = {"start": start, "end": end_day, "granularity": args.granularity}
    print(f"running: airflow dags test backfill_orders --conf '{json.dumps(conf)}'")
    t1 = time.monotonic()
    run("dags", "test", "backfill_orders", "--conf", json.dumps(conf), log="dags_test.log")
    wall = time.monotonic() - t1

    with psycopg2.connect(dst_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), sum(rows_extracted), sum(rows_inserted), sum(seconds), min(chunk_id), max(chunk_id) FROM backfill_ledger"
        )
        chunks, rows, inserted, secs, first, last = cur.fetchone()
        rows, inserted, secs = int(rows or 0), int(inserted or 0), float(secs or 0)
        cur.execute("SELECT count(*) FROM orders")
        dst_rows = cur.fetchone()[0]
        cur.execute(
            "SELECT status, days, days_warn, days_fail, worst_diff FROM backfill_validation ORDER BY id DESC LIMIT 1"
            if _exists(cur, "backfill_validation")
            else "SELECT NULL, NULL, NULL, NULL, NULL"
        )
        v_status, v_days, v_warn, v_fail, v_worst = cur.fetchone()
    with psycopg2.connect(src_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM orders")
        src_rows = cur.fetchone()[0]

    print()
    print(f"chunks loaded        : {chunks} ({args.granularity}: {first} .. {last})")
    print(f"rows extracted       : {rows:,} (inserted {inserted:,})")
    print(f"chunk time (sum)     : {secs:.1f}s  -> {rows / secs:,.0f} rows/s inside chunks")
    print(f"DAG run wall time    : {wall:.1f}s -> {rows / wall:,.0f} rows/s end to end (incl. Airflow start-up)")
    print(f"source rows          : {src_rows:,}")
    print(f"destination rows     : {dst_rows:,}")
    if v_status is not None:
        print(
            f"validation           : {v_status} ({v_days} days compared, {v_warn} warn, {v_fail} fail, worst diff {v_worst:.4%})"
        )
    ok = src_rows == dst_rows == rows
    print("RESULT               : " + ("OK, destination rows == source rows" if ok else "MISMATCH"))
    print(f"logs                 : {REPO / '.demo'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
