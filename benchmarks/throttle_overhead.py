"""The default throttle's cost on an idle source (issue 23): one chunk of ``--rows`` rows, throttle default
(latency budget with its start window, read watch) against off (``max_latency_ratio: null``,
``watch_reads: false``), runs alternated. Each run = the chunk operator's gate (probe_load, and the latency
window when the budget is on) + transfer_chunk into an empty destination table. Not a test: prints seconds.

    .venv/bin/python -m benchmarks.throttle_overhead --rows 300000 --runs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
import uuid

import psycopg2

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.connections import close_all, open_destination, open_source
from airflow_backfill_provider.throttle.loadsignal import add_latency
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.throttle.probe import PROBE_TIMEOUT_S, probe_load
from airflow_backfill_provider.transfer.chunk import Sessions, transfer_chunk
from tests.seed import ORDERS_SPEC, create_orders, seed_orders


def _db(admin_url: str, name: str) -> str:
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return admin_url.rpartition("/")[0] + "/" + name


def one_run(spec, chunk) -> float:
    t0 = time.monotonic()
    conn = open_source(spec, "backfill:overhead:gate")
    try:
        sample = probe_load(conn, timeout_s=PROBE_TIMEOUT_S)  # what the chunk operator does before it reads
        if spec.throttle.max_latency_ratio is not None:
            sample = add_latency(sample, conn, spec, "backfill:overhead:gate")
    except BaseException:
        close_all(conn)
        raise
    dst = open_destination(spec, "backfill:overhead:gate")
    try:
        transfer_chunk(spec, chunk, sessions=Sessions(conn, dst))
    finally:
        close_all(conn, dst)
    return time.monotonic() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    tag = uuid.uuid4().hex[:8]
    src, dst = _db(args.admin_url, f"bf_ovh_src_{tag}"), _db(args.admin_url, f"bf_ovh_dst_{tag}")
    try:
        c = psycopg2.connect(src)
        seed_orders(c, rows=args.rows, days=1, start=dt.date(2024, 1, 1))
        c.close()
        c = psycopg2.connect(dst)
        create_orders(c)
        c.close()
        chunk = plan_chunks("2024-01-01", "2024-01-02", "day", "UTC")[0]
        base = dict(ORDERS_SPEC, source_conn_id=src, destination_conn_id=dst)
        modes = {
            "default": load_spec(base),
            "off": load_spec(dict(base, throttle={"max_latency_ratio": None, "watch_reads": False})),
        }
        times: dict[str, list[float]] = {m: [] for m in modes}
        one_run(modes["default"], chunk)  # warm-up (caches; the baseline row, if the window measured anything)
        for _ in range(args.runs):
            for mode, spec in modes.items():
                d = psycopg2.connect(dst)
                d.autocommit = True
                with d.cursor() as cur:
                    cur.execute("TRUNCATE orders; DELETE FROM backfill_ledger")
                d.close()
                times[mode].append(one_run(spec, chunk))
        for mode, ts in times.items():
            print(f"{mode:8s} " + " ".join(f"{t:.2f}" for t in ts) + f"  median {statistics.median(ts):.2f} s")
        print(f"default/off (medians): {statistics.median(times['default']) / statistics.median(times['off']):.2f}x")
    finally:
        a = psycopg2.connect(args.admin_url)
        a.autocommit = True
        with a.cursor() as cur:
            for name in (f"bf_ovh_src_{tag}", f"bf_ovh_dst_{tag}"):
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        a.close()


if __name__ == "__main__":
    main()
