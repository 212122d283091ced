"""Source impact: pgbench on the source while a backfill runs under a real scheduler (issue 17).

    make bench-source ROWS=100000            # = .venv/bin/python -m benchmarks.source_impact --rows 100000

Two layouts, as in production and as on a laptop:

- **separate**: the source is a private PostgreSQL cluster on its own port (benchmarks/pgcluster.py:
  initdb into .bench_pg/, run as the ``postgres`` user, stopped and removed at the end); the destination
  and Airflow's metadata database are on the shared server (``--admin-url``);
- **shared**: source, destination and metadata database on the shared server.

The source holds the time-scattered ``orders_wide`` table (benchmarks/scattered.py) and pgbench's
TPC-B-like tables (``-s --scale``). pgbench ``-c 4 -j 2`` runs in back-to-back 3-second runs with
per-transaction logs (``-l``), so TPS, average and p99 latency can be cut exactly at the phase
boundaries: **before** (no backfill), **during** (the whole backfill of the table through a real
scheduler: LocalExecutor, 4-slot pool, triggerer), **after**. Each layout runs the backfill twice:
throttle **off** (``max_latency_ratio: null``, ``watch_reads: false``) and **on** (the default spec's
latency budget and read watch, with ``--max-latency-ratio``), each into an empty
destination. The source's quiet baseline is learned from one window during "before" (what the baseline
table holds on a source the provider already knows).

A third scenario (separate layout, throttle on) starts the backfill on a quiet source, starts pgbench
mid-backfill for ``--mid-load-seconds`` and stops it: the deferred chunks counted every second show the
throttle backing off while the load runs and recovering after it, and the run must still complete.

Everything is printed as ratios from this one run (and written as JSON). Nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2

from benchmarks import scattered
from benchmarks.pgcluster import PrivateCluster, pg_bin
from benchmarks.seed import DEFAULT_START, Databases

DEFAULT_ADMIN_URL = os.environ.get(
    "BENCH_PG_URL", os.environ.get("BACKFILL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
)


def log(msg: str) -> None:
    print(f"[bench-source {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Oltp:
    """pgbench -c 4 -j 2 in back-to-back short runs with per-transaction logs, in a thread, until stop()."""

    def __init__(self, url: str, folder: Path, step_s: int = 3, clients: int = 4, jobs: int = 2):
        self.url, self.folder, self.step_s, self.clients, self.jobs = url, folder, step_s, clients, jobs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.runs = 0
        self.errors: list[str] = []

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.runs += 1
            proc = subprocess.run(
                [
                    pg_bin("pgbench"),
                    "-n",
                    "-c",
                    str(self.clients),
                    "-j",
                    str(self.jobs),
                    "-T",
                    str(self.step_s),
                    "-l",
                    "--log-prefix",
                    str(self.folder / f"pgb{self.runs:05d}"),
                    self.url,
                ],
                cwd=self.folder,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                self.errors.append(proc.stderr[-300:])
                if len(self.errors) > 3:
                    return

    def start(self) -> "Oltp":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.step_s + 60)

    def transactions(self) -> list[tuple[float, float]]:
        """(completion epoch seconds, latency ms) of every logged transaction."""
        out = []
        for path in self.folder.glob("pgb*"):
            for line in path.read_text().splitlines():
                f = line.split()
                if len(f) >= 6 and f[2] != "skipped":
                    out.append((int(f[4]) + int(f[5]) / 1e6, int(f[2]) / 1000.0))
        return out


def phase_stats(txns: list[tuple[float, float]], start: float, end: float) -> dict:
    lat = sorted(ms for t, ms in txns if start <= t < end)
    if not lat or end <= start:
        return {"seconds": round(end - start, 1), "transactions": 0}
    return {
        "seconds": round(end - start, 1),
        "transactions": len(lat),
        "tps": len(lat) / (end - start),
        "avg_ms": statistics.fmean(lat),
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def quiet_baseline(src_url: str, dst_url: str, key: str, windows: int = 3) -> dict:
    """Learn the source's baseline (lowest of a few windows) into the destination's baseline table."""
    from airflow_backfill_provider.loadsignal import learn_baseline, sample_window

    src = psycopg2.connect(src_url, application_name="backfill:bench:baseline")
    dst = psycopg2.connect(dst_url)
    try:
        for _ in range(windows):
            b = learn_baseline(dst, "public.backfill_load_baseline", key, sample_window(src, window_s=1.0))
    finally:
        src.close()
        dst.close()
    return b.to_dict()


def specs(args) -> list[dict]:
    """Four DAGs: {separate, shared} x {throttle off, on}; same table, same chunking (the default)."""
    out = []
    for layout in ("separate", "shared"):
        for mode in ("off", "on"):
            throttle = (
                {"max_latency_ratio": None, "watch_reads": False}  # the latency budget and read watch are on by default
                if mode == "off"
                else {
                    "max_latency_ratio": args.max_latency_ratio,
                    "load_window_s": args.window,
                    "poll_interval": 1.0,
                    "poll_max": 2.0,
                    "max_wait": 3600,
                }
            )
            out.append(
                scattered.spec_dict(
                    src_conn=f"bench_src_{layout}",
                    dst_conn="backfill_dest_pg",
                    name=f"src_{layout}_{mode}",
                    throttle=throttle,
                    validation={"enabled": False},
                )
            )
    return out


def run_scenario(
    sb, args, layout: str, mode: str, src_url: str, dst_url: str, tmp: Path, mid_load: bool = False
) -> dict:
    dag_id = f"backfill_src_{layout}_{mode}"
    scattered.fresh_destination(dst_url)
    if mode == "on":
        # the learned baseline is kept per source connection id; forget it: each scenario learns its own
        conn = psycopg2.connect(dst_url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS public.backfill_load_baseline")
        conn.close()
    start = DEFAULT_START.date()
    conf = {"start": start.isoformat(), "end": (start + dt.timedelta(days=args.days)).isoformat(), "reprocess": True}
    oltp = Oltp(src_url, tmp / f"{layout}_{mode}{'_mid' if mid_load else ''}")
    marks: dict[str, float] = {}
    deferred_series: list[tuple[float, int]] = []
    result: dict = {"layout": layout, "throttle": mode, "mid_load": mid_load}
    sb.wait_idle()
    if not mid_load:
        oltp.start()
        marks["before"] = time.time()
        if mode == "on":
            time.sleep(2)  # pgbench running: learn the quiet baseline from the OLTP as it is without us
            result["baseline"] = quiet_baseline(src_url, dst_url, f"bench_src_{layout}")
        time.sleep(max(0.0, args.phase_seconds - (time.time() - marks["before"])))
    else:
        # the baseline needs transactions to measure: learn it from a short pgbench run, then stop it
        warm = Oltp(src_url, tmp / f"{layout}_{mode}_baseline").start()
        time.sleep(2)
        result["baseline"] = quiet_baseline(src_url, dst_url, f"bench_src_{layout}")
        warm.stop()
    marks["during"] = time.time()
    run_id = sb.start_run(dag_id, conf)
    load_on_at = load_off_at = None

    def poll():
        nonlocal load_on_at, load_off_at
        now = time.time()
        deferred_series.append((now, sb.deferred_now(dag_id, run_id)))
        if mid_load and load_on_at is None and now - marks["during"] >= args.mid_load_after:
            log(f"{dag_id}: starting pgbench mid-backfill")
            oltp.start()
            load_on_at = time.time()
        elif mid_load and load_on_at and load_off_at is None and now - load_on_at >= args.mid_load_seconds:
            oltp.stop()
            load_off_at = time.time()
            log(f"{dag_id}: pgbench stopped")

    figures = sb.wait_run(dag_id, run_id, timeout=args.timeout, on_poll=poll)
    marks["after"] = time.time()
    if mid_load:
        if load_on_at and not load_off_at:
            oltp.stop()
            load_off_at = time.time()
    else:
        time.sleep(args.phase_seconds)
        marks["end"] = time.time()
        oltp.stop()
    result.update(
        backfill_seconds=figures["run_seconds"],
        run_state=figures["state"],
        chunks=figures["chunks"],
        rows_loaded=scattered.count(dst_url),
        pgbench_runs=oltp.runs,
        pgbench_errors=oltp.errors[:2],
        max_deferred_at_once=max((n for _, n in deferred_series), default=0),
    )
    txns = oltp.transactions()
    if mid_load:
        on, off = load_on_at or marks["after"], load_off_at or marks["after"]
        result["load_window"] = [round(on - marks["during"], 1), round(off - marks["during"], 1)]
        result["deferred_before_load"] = max((n for t, n in deferred_series if t < on), default=0)
        result["deferred_during_load"] = max(
            (n for t, n in deferred_series if on + args.window + 2 <= t < off), default=0
        )
        late = [n for t, n in deferred_series if t >= off + 2 * args.window + 5]
        result["deferred_after_load"] = max(late, default=0)
        result["seconds_after_load"] = round(marks["after"] - off, 1)
        result["oltp_during"] = phase_stats(txns, on, off)
    else:
        result["oltp"] = {
            "before": phase_stats(txns, marks["before"], marks["during"]),
            "during": phase_stats(txns, marks["during"], marks["after"]),
            "after": phase_stats(txns, marks["after"], marks["end"]),
        }
    log(f"{dag_id}{' (mid-backfill load)' if mid_load else ''}: {json.dumps(result, default=str)}")
    return result


def ratio(a, b):
    return a / b if a is not None and b else None


def report_lines(results: list[dict], target: float) -> list[str]:
    lines = [
        f"{'layout':<9} {'throttle':<8} {'TPS before':>10} {'during':>7} {'after':>7} {'avg ms b/d':>12} "
        f"{'p99 ms b/d':>13} {'TPS x':>6} {'avg x':>6} {'p99 x':>6} {'after p99 x':>11} {'backfill s':>10} {'max deferred':>12}",
    ]
    walls = {}
    for r in results:
        if r.get("mid_load") or "oltp" not in r:
            continue
        b, d, a = r["oltp"]["before"], r["oltp"]["during"], r["oltp"]["after"]
        walls[(r["layout"], r["throttle"])] = r["backfill_seconds"]
        fmt = lambda v, s=".0f": "-" if v is None else format(v, s)  # noqa: E731
        lines.append(
            f"{r['layout']:<9} {r['throttle']:<8} {fmt(b.get('tps')):>10} {fmt(d.get('tps')):>7} {fmt(a.get('tps')):>7} "
            f"{fmt(b.get('avg_ms'), '.2f') + '/' + fmt(d.get('avg_ms'), '.2f'):>12} "
            f"{fmt(b.get('p99_ms'), '.1f') + '/' + fmt(d.get('p99_ms'), '.1f'):>13} "
            f"{fmt(ratio(d.get('tps'), b.get('tps')), '.2f'):>6} {fmt(ratio(d.get('avg_ms'), b.get('avg_ms')), '.2f'):>6} "
            f"{fmt(ratio(d.get('p99_ms'), b.get('p99_ms')), '.2f'):>6} {fmt(ratio(a.get('p99_ms'), b.get('p99_ms')), '.2f'):>11} "
            f"{r['backfill_seconds']:>10.1f} {r['max_deferred_at_once']:>12}"
            + (
                ""
                if r["run_state"] == "success" and r["rows_loaded"]
                else f"  RUN {r['run_state']}, {r['rows_loaded']} rows"
            )
        )
    for layout in ("separate", "shared"):
        if (layout, "on") in walls and (layout, "off") in walls:
            lines.append(
                f"{layout}: backfill with the throttle on took {walls[(layout, 'on')] / walls[(layout, 'off')]:.2f}x "
                "its time with the throttle off"
            )
    for r in results:
        if r.get("mid_load"):
            lines.append(
                f"mid-backfill load ({r['layout']}, throttle on): pgbench from {r['load_window'][0]} s to {r['load_window'][1]} s; "
                f"chunks deferred at once: before the load {r['deferred_before_load']}, during it (max) "
                f"{r['deferred_during_load']}, after it (settled) {r['deferred_after_load']}; run {r['run_state']} "
                f"{r['seconds_after_load']} s after the load stopped, {r['rows_loaded']} rows, wall {r['backfill_seconds']:.1f} s"
            )
    sep_on = next(
        (r for r in results if r["layout"] == "separate" and r["throttle"] == "on" and not r.get("mid_load")), None
    )
    if sep_on and "oltp" in sep_on:
        v = ratio(sep_on["oltp"]["during"].get("p99_ms"), sep_on["oltp"]["before"].get("p99_ms"))
        status = "n/a " if v is None else ("MET " if v <= target else "MISS")
        lines.append(
            f"target (issue 17): separate servers, throttle on, p99 during / before <= {target}: "
            f"[{status}] {'-' if v is None else format(v, '.2f')}"
        )
    mid = next((r for r in results if r.get("mid_load")), None)
    if mid:
        ok = mid["deferred_during_load"] > 0 and mid["deferred_after_load"] == 0 and mid["run_state"] == "success"
        lines.append(
            f"target (issue 17): backs off under a mid-backfill load and recovers after it, run completes: "
            f"[{'MET ' if ok else 'MISS'}]"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.source_impact", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_500_000, help="rows of the source table (default 1,500,000)")
    p.add_argument("--days", type=int, default=730, help="days its created_at spans (default 730: 730 daily chunks)")
    p.add_argument("--scale", type=int, default=10, help="pgbench scale of the source's OLTP tables (default 10)")
    p.add_argument("--phase-seconds", type=float, default=20, help="length of the before and after phases")
    p.add_argument("--max-latency-ratio", type=float, default=1.5, help="throttle.max_latency_ratio when on")
    p.add_argument("--window", type=float, default=1.0, help="throttle.load_window_s when on")
    p.add_argument("--layouts", default="separate,shared", help="separate, shared or both")
    p.add_argument("--skip-mid-load", action="store_true", help="skip the mid-backfill load scenario")
    p.add_argument("--mid-load-after", type=float, default=15, help="start pgbench this many s into the backfill")
    p.add_argument("--mid-load-seconds", type=float, default=30, help="and run it this long")
    p.add_argument("--timeout", type=float, default=7200, help="give up on one backfill run after this many s")
    p.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in ("separate", "shared")]
    if bad or not layouts:
        p.error(f"--layouts takes separate, shared or both (comma-separated), got {args.layouts!r}")
    from benchmarks.sandbox import BackfillSandbox

    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    dbs = Databases(args.admin_url)
    results: list[dict] = []
    with PrivateCluster() as pc, tempfile.TemporaryDirectory(prefix="bench_source_") as tmp:
        try:
            shared_src, dst = dbs.create()
            srcs = {"separate": pc.create_database("bench_src"), "shared": shared_src}
            for layout in layouts:
                log(f"{layout}: seeding {args.rows:,} rows and pgbench scale {args.scale} on the source")
                scattered.seed(srcs[layout], args.rows, args.days)
                subprocess.run(
                    [pg_bin("pgbench"), "-i", "-q", "-s", str(args.scale), srcs[layout]],
                    check=True,
                    capture_output=True,
                    timeout=1800,
                )
            sb = BackfillSandbox(args.admin_url, shared_src, dst, specs(args), log=log)
            sb.env.update({f"AIRFLOW_CONN_BENCH_SRC_{k.upper()}": v for k, v in srcs.items()})
            with sb:
                sb.start_services()
                for layout in layouts:
                    for mode in ("off", "on"):
                        log(f"{layout}, throttle {mode}")
                        results.append(run_scenario(sb, args, layout, mode, srcs[layout], dst, Path(tmp)))
                if "separate" in layouts and not args.skip_mid_load:
                    log("separate, throttle on, pgbench starting mid-backfill")
                    results.append(
                        run_scenario(sb, args, "separate", "on", srcs["separate"], dst, Path(tmp), mid_load=True)
                    )
        finally:
            dbs.drop()
    load_end = [round(x, 2) for x in os.getloadavg()]
    print()
    print(
        f"source impact: {args.rows:,} rows over {args.days} days (default chunking), pgbench -c 4 -j 2 scale "
        f"{args.scale}, throttle on = max_latency_ratio {args.max_latency_ratio}, window {args.window} s; "
        f"load {load_start} -> {load_end}"
    )
    print("\n".join(report_lines(results, 1.2)))
    print(f"total {time.perf_counter() - t0:.0f}s")
    path = args.json or Path(__file__).parent / "results" / f"bench-source-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
