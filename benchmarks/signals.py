"""Which load signals move under a real OLTP load? Measure the candidates side by side (issue 17).

    PYTHONPATH=. .venv/bin/python -m benchmarks.signals --rows 100000 --seconds 8

A private source cluster (benchmarks/pgcluster.py) gets a pgbench database and an ``orders`` table.
Four phases of ``--seconds`` each: idle; backfill-like load alone (4 threads streaming chunks of the
source's ``orders`` through the COPY pipe into a destination on the shared server); pgbench alone
(``-c 4 -j 2``, TPC-B-like); pgbench plus the backfill-like load. In every phase the candidates are
sampled from a separate session, as the throttle would:

- xact_latency_ms: server-wide transaction latency by Little's law (sessions in a transaction / xact rate)
- canary: latency of ``SELECT 1`` round trips (median of bursts of 3, one burst every 0.2 s)
- aas: server-wide average active client sessions (``pg_stat_activity``, all databases, ours excluded)
- io_wal_waits: server-wide sessions waiting on IO or WAL (``wait_event_type = 'IO'`` or ``WAL*`` LWLocks)
- xact_rate: server-wide transactions per second (``pg_stat_database``, summed over databases)
- pgbench's own TPS and latency, for reference

It prints one line per phase, the ratio of each signal to its idle value, and writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time

import psycopg2

from benchmarks.pgcluster import PrivateCluster, pg_bin
from benchmarks.seed import Databases, seed_orders
from benchmarks import baselines, dest


KEYS = ("xact_latency_ms", "canary_ms", "aas", "in_xact", "io_wal_waits", "xact_rate")


def sampler(url: str, seconds: float, stop_early=None) -> dict:
    from airflow_backfill_provider.throttle.loadsignal import sample_window

    conn = psycopg2.connect(url, application_name="bench-signals")
    conn.autocommit = True
    windows = []
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end:
            w = sample_window(conn, window_s=2.0)
            windows.append(w)
    finally:
        conn.close()
    agg = {}
    for k in KEYS:
        vals = [getattr(w, k) for w in windows if getattr(w, k) is not None]
        agg[k] = statistics.median(vals) if vals else None
    agg["windows"] = len(windows)
    return agg


def backfill_like(src_url: str, dst_url: str, stop: threading.Event, threads: int = 4, slices: int = 40):
    import datetime as dt

    from benchmarks.seed import DEFAULT_START

    chunks = []
    step = dt.timedelta(days=730) / slices
    for i in range(slices):
        a, b = DEFAULT_START + step * i, DEFAULT_START + step * (i + 1)
        chunks.append({"chunk_id": str(i), "start": a.isoformat(), "end": b.isoformat()})

    def worker(n):
        i = n
        while not stop.is_set():
            # named like our chunks, so the signal excludes them as it excludes real chunks
            baselines.reference_upsert(src_url + "?application_name=backfill:bench", dst_url, [chunks[i % slices]])
            i += threads

    ts = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in ts:
        t.start()
    return ts


def pgbench(url: str, seconds: int) -> subprocess.Popen:
    return subprocess.Popen(
        [pg_bin("pgbench"), "-n", "-c", "4", "-j", "2", "-T", str(seconds), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--scale", type=int, default=5)
    p.add_argument("--shared", action="store_true", help="source on the shared server, not a private cluster")
    args = p.parse_args(argv)
    dbs = Databases("postgresql://postgres@127.0.0.1:5432/postgres")
    with PrivateCluster() as pc:
        if args.shared:
            src_url, dst_url = dbs.create()
        else:
            _, dst_url = dbs.create()
            src_url = pc.create_database("src")
        try:
            seed_orders(src_url, args.rows, 730)
            dest.fresh_table(dst_url)
            subprocess.run(
                [pg_bin("pgbench"), "-i", "-q", "-s", str(args.scale), src_url], check=True, capture_output=True
            )
            rows = {}
            for phase in ("idle", "backfill", "pgbench", "pgbench+backfill"):
                stop = threading.Event()
                ts = backfill_like(src_url, dst_url, stop) if "backfill" in phase else []
                pb = pgbench(src_url, args.seconds + 2) if "pgbench" in phase else None
                time.sleep(1)  # let the load ramp up
                rows[phase] = sampler(src_url, args.seconds)
                stop.set()
                for t in ts:
                    t.join()
                if pb:
                    out, _ = pb.communicate()
                    for line in out.splitlines():
                        if line.startswith("tps =") or "latency average" in line:
                            rows[phase].setdefault("pgbench", []).append(line.strip())
                print(phase, rows[phase], flush=True)
            idle = rows["idle"]
            for phase, r in rows.items():
                ratios = {k: (r[k] / idle[k] if r[k] and idle[k] else None) for k in KEYS}
                print(f"{phase:<18} " + "  ".join(f"{k} {v:.2f}x" if v else f"{k} -" for k, v in ratios.items()))
            base = rows["pgbench"]
            print("relative to pgbench alone (the harm the backfill adds):")
            r = rows["pgbench+backfill"]
            print("  " + "  ".join(f"{k} {r[k] / base[k]:.2f}x" if r[k] and base[k] else f"{k} -" for k in KEYS))
        finally:
            dbs.drop()


if __name__ == "__main__":
    main()
