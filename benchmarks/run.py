"""Benchmark: our chunk transfer path against its physical limit, a hand-written reference and the usual loops.

    PYTHONPATH=. .venv/bin/python -m benchmarks.run            # 2,000,000 rows over 730 days
    PYTHONPATH=. .venv/bin/python -m benchmarks.run --quick    # 200,000 rows, one repetition

One run seeds throwaway source/destination databases, measures every path over the same chunks (each
measurement in its own child process, for its own peak RSS), prints one table with rows/s, seconds, RSS
and the ratios to (2) the COPY pipe and (3) the hand-written reference, checks the targets, writes the
same as JSON, and drops the databases. See benchmarks/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import dest
from benchmarks.report import ROWS, TARGETS, environment, table_lines, target_lines
from benchmarks.rss import ChildFailed, run_isolated
from benchmarks.seed import DEFAULT_START, Databases, seed_orders, time_at_row

DEFAULT_ADMIN_URL = os.environ.get(
    "BENCH_PG_URL", os.environ.get("BACKFILL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
)
RSS_SIZES = {"ours_rss_10k": 10_000, "ours_rss_100k": 100_000, "ours_rss_1m": 1_000_000}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="rows seeded into the source (default 2,000,000)")
    p.add_argument("--days", type=int, default=730, help="days the rows are spread over (default 730)")
    p.add_argument(
        "--granularity",
        choices=("hour", "day", "week", "month"),
        default="month",
        help="chunk size as the operator plans it (default month: 24 chunks of ~83k rows)",
    )
    p.add_argument(
        "--chunks", type=int, default=None, help="instead of calendar chunks, cut the range into this many equal slices"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="repetitions of (1), (2), (3), interleaved; the best is reported (default 3)",
    )
    p.add_argument(
        "--sample-rows",
        type=int,
        default=20_000,
        help="rows for (5) GenericTransfer/insert_rows, which is too slow for the full table",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here (default benchmarks/results/)")
    p.add_argument("--quick", action="store_true", help="200,000 rows, --repeat 1 (a smaller, faster run)")
    p.add_argument(
        "--skip-airflow",
        action="store_true",
        help="skip the measurements that need Airflow: (5) GenericTransfer and (8) DAG overhead",
    )
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="(1) without the operator's source load probe before each chunk (transfer_chunk only)",
    )
    p.add_argument(
        "--airflow2-python",
        default=os.environ.get("BENCH_AIRFLOW2_PYTHON"),
        help="a python with Airflow 2.11 (e.g. .venv-af2/bin/python): (5) again there, where "
        "PostgresHook uses psycopg2 (env BENCH_AIRFLOW2_PYTHON)",
    )
    p.add_argument("--skip-overhead", action="store_true", help="skip only (8), the DAG overhead runs (minutes)")
    p.add_argument("--overhead-chunks", type=int, default=24, help="N chunks / task instances for (8)")
    p.add_argument(
        "--admin-url", default=DEFAULT_ADMIN_URL, help="a PostgreSQL URL allowed to CREATE DATABASE (env BENCH_PG_URL)"
    )
    p.add_argument("--keep", action="store_true", help="keep the throwaway databases (their names are printed)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed (off: machines are noisy)")
    p.add_argument(
        "--scattered-rows",
        type=int,
        default=1_500_000,
        help="(9) rows of the time-scattered table loaded end to end by every tool (default 1,500,000)",
    )
    p.add_argument("--scattered-days", type=int, default=730, help="(9) days its created_at is scattered over")
    p.add_argument("--skip-scattered", action="store_true", help="skip (9), the end-to-end comparison with peers")
    p.add_argument("--only-scattered", action="store_true", help="run (9) only")
    p.add_argument("--skip-peers", action="store_true", help="(9) without Sling and dlt")
    args = p.parse_args(argv)
    if args.quick:
        if "--rows" not in (argv if argv is not None else sys.argv):
            args.rows = 200_000
        if "--scattered-rows" not in (argv if argv is not None else sys.argv):
            args.scattered_rows = 100_000
            if "--scattered-days" not in (argv if argv is not None else sys.argv):
                args.scattered_days = 60
        args.repeat = 1
    for name in ("rows", "days", "repeat", "sample_rows", "overhead_chunks", "scattered_rows", "scattered_days"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.chunks is not None and args.chunks < 1:
        p.error(f"--chunks must be at least 1, got {args.chunks}")
    return args


def plan(args) -> list[dict]:
    start = DEFAULT_START
    end = start + dt.timedelta(days=args.days)
    if args.chunks:
        step = (end - start) / args.chunks
        edges = [start + step * i for i in range(args.chunks)] + [end]
        return [
            {"chunk_id": f"slice-{i + 1:03d}", "start": a.isoformat(), "end": b.isoformat()}
            for i, (a, b) in enumerate(zip(edges, edges[1:]))
        ]
    from airflow_backfill_provider.core.chunks import plan_chunks

    return [c.to_descriptor() for c in plan_chunks(start, end, args.granularity, "UTC", max_chunks=100_000)]


def leading_chunk(src_url: str, rows: int, label: str, range_end: dt.datetime) -> dict:
    """One chunk from the start of the range holding ``rows`` rows (or all of them, if fewer)."""
    end = time_at_row(src_url, rows) or range_end
    return {"chunk_id": label, "start": DEFAULT_START.isoformat(), "end": end.isoformat()}


class Bench:
    def __init__(self, args, src_url: str, dst_url: str, chunks: list[dict]):
        self.args, self.src, self.dst, self.chunks = args, src_url, dst_url, chunks
        self.samples: dict[str, list[dict]] = {}
        self.results: dict[str, dict] = {}

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def measure(
        self, key: str, task: str, chunks: list[dict], *, first_load: bool, env=None, python=None, **extra
    ) -> dict | None:
        """One measurement in a child: fresh table (first load) or the table as the first load left it (rerun)."""
        if first_load:
            dest.fresh_table(self.dst)
            dest.level_field(self.dst)
        else:
            dest.level_field(self.dst, "orders")
        before = dest.tuple_stats(self.dst)
        marker = dest.xid_marker(self.dst)
        if task == "generic_transfer":
            kwargs = {"src_conn_id": "bench_src", "dst_conn_id": "bench_dst", "chunks": chunks}
        else:
            kwargs = {"src_url": self.src, "dst_url": self.dst, "chunks": chunks}
            if task == "ours":
                kwargs["probe"] = not self.args.no_probe
        try:
            result = run_isolated(task, {**kwargs, **extra}, env=env, python=python)
        except ChildFailed as err:
            self.log(str(err))
            self.results[key] = {"skipped": f"failed: {str(err).splitlines()[-1][:120]}"}
            return None
        after = dest.tuple_stats(self.dst)
        result["rows_rewritten"] = dest.rows_written_since(self.dst, marker) if not first_load else None
        result["n_tup_upd_delta"] = after["upd"] - before["upd"]
        result["n_tup_ins_delta"] = after["ins"] - before["ins"]
        result["rows_per_s"] = result["rows"] / result["seconds"] if result["seconds"] > 0 else None
        if key not in ("ours_first", "reference_first"):  # per-chunk times only where they explain a ratio
            result.pop("per_chunk", None)
        self.samples.setdefault(key, []).append(result)
        self.log(f"{key}: {result['rows']} rows in {result['seconds']:.2f}s, peak RSS {result['peak_rss_mb']} MB")
        return result

    def check_copy(self, key: str) -> None:
        """After a first load, the destination must hold exactly the source's rows."""
        same = dest.fingerprint(self.dst) == self.source_fingerprint
        self.samples[key][-1]["identical_to_source"] = same
        if not same:
            self.log(f"{key}: destination differs from source!")

    def core(self) -> None:
        """(1), (2), (3): interleaved, order alternating per repetition, so drift hits all of them alike."""
        self.source_fingerprint = dest.fingerprint(self.src)  # also warms the cache for whoever goes first
        for rep in range(self.args.repeat):
            order = ["physical", "reference", "ours"] if rep % 2 == 0 else ["ours", "reference", "physical"]
            for path in order:
                key_first = "physical" if path == "physical" else f"{path}_first"
                self.log(f"repetition {rep + 1}/{self.args.repeat}: {key_first}")
                if self.measure(key_first, path, self.chunks, first_load=True) is None:
                    continue
                if rep == 0:
                    self.check_copy(key_first)
                if path != "physical":
                    self.measure(f"{path}_rerun", path, self.chunks, first_load=False)

    def naive(self) -> None:
        self.log("naive loop (4)")
        if self.measure("naive_first", "naive", self.chunks, first_load=True):
            self.check_copy("naive_first")

    def generic_transfer(self, range_end) -> None:
        if self.args.skip_airflow:
            self.results["generic_transfer"] = {"skipped": "--skip-airflow"}
            self.results["generic_transfer_af2"] = {"skipped": "--skip-airflow"}
            return
        sample = leading_chunk(self.src, self.args.sample_rows, f"first-{self.args.sample_rows}-rows", range_end)
        with tempfile.TemporaryDirectory(prefix="bench_airflow_home_") as home:
            self._generic_transfer(sample, home)

    def _generic_transfer(self, sample: dict, home: str) -> None:
        env = {
            "AIRFLOW_HOME": home,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "AIRFLOW_CONN_BENCH_SRC": self.src,
            "AIRFLOW_CONN_BENCH_DST": self.dst,
        }
        self.log(f"GenericTransfer/insert_rows (5) on a sample of {self.args.sample_rows} rows")
        r = self.measure("generic_transfer", "generic_transfer", [sample], first_load=True, env=env)
        if r:
            r["note"] = f"sample: first {r['rows']:,} rows (too slow for all)"
        if not self.args.airflow2_python:
            self.results["generic_transfer_af2"] = {"skipped": "no --airflow2-python"}
            return
        self.log("GenericTransfer/insert_rows (5) on Airflow 2.11")
        home2 = os.path.join(home, "airflow2")  # its own AIRFLOW_HOME: 2.11 and 3.3 configs differ
        os.mkdir(home2)
        r = self.measure(
            "generic_transfer_af2",
            "generic_transfer",
            [sample],
            first_load=True,
            env={**env, "AIRFLOW_HOME": home2},
            python=self.args.airflow2_python,
        )
        if r:
            r["note"] = f"sample: first {r['rows']:,} rows; psycopg2 executemany"

    def rss(self, range_end) -> None:
        """(7) Peak RSS of our path with one chunk of 10k, 100k and 1M rows, each in a fresh process."""
        for key, size in RSS_SIZES.items():
            chunk = leading_chunk(self.src, size, f"first-{size}-rows", range_end)
            self.log(f"peak RSS (7): {key}")
            r = self.measure(key, "ours", [chunk], first_load=True)
            if r and r["rows"] < size:
                r["note"] = f"only {r['rows']:,} rows in the source (asked {size:,})"
        try:
            r = run_isolated("idle", {"import_ours": True})
        except ChildFailed as err:
            self.results["idle_ours"] = {"skipped": f"failed: {str(err).splitlines()[-1][:120]}"}
            return
        r["note"] = "python + airflow_backfill_provider.transfer.chunk imported"
        self.samples["idle_ours"] = [r]

    def summarize(self) -> None:
        for key, runs in self.samples.items():
            best = min(runs, key=lambda r: r["seconds"]) if runs[0]["rows"] else runs[0]
            row = dict(best)
            if len(runs) > 1:
                row["seconds_all"] = [round(r["seconds"], 3) for r in runs]
                row["seconds_median"] = statistics.median(r["seconds"] for r in runs)
                row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
                row["rows_rewritten"] = (
                    max((r["rows_rewritten"] or 0) for r in runs) if best["rows_rewritten"] is not None else None
                )
                row["n_tup_upd_delta"] = max(r["n_tup_upd_delta"] for r in runs)
            row["repetitions"] = len(runs)
            self.results[key] = row
        phys = self.results.get("physical", {}).get("rows_per_s")
        for key, row in self.results.items():
            if not row.get("rows_per_s"):
                continue
            ref_key = "reference_rerun" if key.endswith("_rerun") else "reference_first"
            ref = self.results.get(ref_key, {}).get("rows_per_s")
            row["x_physical"] = row["rows_per_s"] / phys if phys else None
            row["x_reference"] = row["rows_per_s"] / ref if ref else None
            notes = [row.get("note", "")]
            if row.get("probe_seconds"):
                notes.append(f"incl. load probe {row['probe_seconds']:.2f}s")
            if row.get("rows_rewritten") is not None:
                notes.append(f"rewrote {row['rows_rewritten']} rows (n_tup_upd +{row['n_tup_upd_delta']})")
            if row.get("identical_to_source") is False:
                notes.append("DESTINATION DIFFERS FROM SOURCE")
            if row.get("repetitions", 1) > 1:
                notes.append(f"best of {row['repetitions']}, median {row['seconds_median']:.2f}s")
            row["note"] = "; ".join(n for n in notes if n)

    def targets(self) -> list[dict]:
        r = self.results

        def rate(key):
            return r.get(key, {}).get("rows_per_s")

        def ratio(a, b):
            return rate(a) / rate(b) if rate(a) and rate(b) else None

        def without_probe(a, b):
            ra, rb = r.get(a, {}), r.get(b, {})
            if not (ra.get("probe_seconds") and rb.get("rows_per_s")):
                return None
            return ra["rows"] / (ra["seconds"] - ra["probe_seconds"]) / rb["rows_per_s"]

        out = [
            {"name": "ours_vs_reference_first", "value": ratio("ours_first", "reference_first"), "op": ">="},
            {"name": "ours_vs_reference_rerun", "value": ratio("ours_rerun", "reference_rerun"), "op": ">="},
        ]
        for phase in ("first", "rerun"):
            value = without_probe(f"ours_{phase}", f"reference_{phase}")
            if value is not None:
                out.append(
                    {
                        "name": f"  same, transfer only ({phase})",
                        "value": value,
                        "op": ">=",
                        "target_key": f"ours_vs_reference_{phase}",
                        "note": "information: without the load probe's time (source protection)",
                        "info": True,
                    }
                )
        out += [
            {"name": "rerun_rows_rewritten", "value": r.get("ours_rerun", {}).get("rows_rewritten"), "op": "=="},
            {"name": "ours_vs_naive", "value": ratio("ours_first", "naive_first"), "op": ">="},
            {"name": "ours_vs_generic_transfer", "value": ratio("ours_first", "generic_transfer"), "op": ">="},
        ]
        rss = r.get("ours_rss_1m", {})
        rss_target = {"name": "rss_1m_rows_mb", "value": rss.get("peak_rss_mb"), "op": "<"}
        if rss.get("rows") is not None and rss["rows"] < RSS_SIZES["ours_rss_1m"]:
            rss_target["note"] = f"chunk had only {rss['rows']:,} rows: not the 1M-row figure"
            rss_target["not_applicable"] = True
        out.append(rss_target)
        for key in ("airflow_dags_test", "airflow_scheduler"):
            row = r.get(key, {})
            t = {
                "name": f"airflow_overhead_ratio ({key.split('_', 1)[1]})",
                "value": row.get("ratio"),
                "op": "<=",
                "target_key": "airflow_overhead_ratio",
            }
            if row.get("raw_ratio") is not None:
                t["note"] = f"net of the chunk's DB work; raw wall-clock ratio {row['raw_ratio']:.2f}"
            out.append(t)
        for t in out:
            t["target"] = TARGETS[t.pop("target_key", t["name"])]
            v = t["value"]
            if v is None or t.pop("not_applicable", False):
                t["met"] = None
            elif t["op"] == ">=":
                t["met"] = v >= t["target"]
            elif t["op"] == "<=":
                t["met"] = v <= t["target"]
            elif t["op"] == "<":
                t["met"] = v < t["target"]
            else:
                t["met"] = v == t["target"] and r["ours_rerun"].get("n_tup_upd_delta") == 0
        return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only_scattered:
        return main_scattered(args)
    t_start = time.perf_counter()
    env = environment(args.admin_url)
    chunks = plan(args)
    range_end = DEFAULT_START + dt.timedelta(days=args.days)
    dbs = Databases(args.admin_url)
    report: dict = {"environment": env}
    try:
        src_url, dst_url = dbs.create()
        bench = Bench(args, src_url, dst_url, chunks)
        bench.log(
            f"databases {dbs.names['src']} -> {dbs.names['dst']}; seeding {args.rows:,} rows over {args.days} days"
        )
        t0 = time.perf_counter()
        seed_orders(src_url, args.rows, args.days)
        seed_s = time.perf_counter() - t0
        bench.log(f"seeded in {seed_s:.1f}s; {len(chunks)} chunks")
        bench.core()
        bench.naive()
        bench.generic_transfer(range_end)
        bench.rss(range_end)
        overhead = run_overhead(args, bench)
        scattered = run_scattered(args, bench.log)
        bench.summarize()
        bench.results.update(overhead)
        for key, _ in ROWS:
            bench.results.setdefault(key, {"skipped": "not measured"})
        targets = bench.targets()
        env["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        report.update(
            config={
                "rows": args.rows,
                "days": args.days,
                "chunks": len(chunks),
                "chunking": f"{args.chunks} equal slices" if args.chunks else f"granularity={args.granularity}",
                "rows_per_chunk_avg": args.rows // max(len(chunks), 1),
                "repeat": args.repeat,
                "sample_rows": args.sample_rows,
                "seed_seconds": round(seed_s, 2),
                "connections": "opened per chunk by every path, as a task instance does",
            },
            results=bench.results,
            targets=targets,
            scattered=scattered,
            total_seconds=round(time.perf_counter() - t_start, 1),
        )
    finally:
        if args.keep:
            print(f"kept databases: {dbs.names}", file=sys.stderr)
        else:
            dbs.drop()

    print_report(report)
    path = args.json or Path(__file__).parent / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nJSON: {path}")
    missed = [
        t for t in report["targets"] + report["scattered"].get("targets", []) if t["met"] is False and not t.get("info")
    ]
    return 1 if (args.check and missed) else 0


def run_scattered(args, log) -> dict:
    """(9) the whole backfill of a time-scattered table under a scheduler, vs Sling and dlt (scattered.py)."""
    if args.skip_scattered:
        return {"skipped": "--skip-scattered"}
    from benchmarks import scattered

    return scattered.measure(args, log)


def main_scattered(args) -> int:
    """``--only-scattered``: (9) alone, printed and written as JSON."""
    from benchmarks import scattered

    env = environment(args.admin_url)
    t0 = time.perf_counter()
    out = run_scattered(args, lambda m: print(f"[bench {time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True))
    env["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(
        f"\nenvironment: {env['cpu']} x{env['cpu_count']}, load {env['loadavg_at_start']} -> {env['loadavg_at_end']}; "
        f"PostgreSQL {env['postgresql']}, Airflow {env['apache-airflow']}; commit {env['git_commit']}"
    )
    print("\n".join(scattered.report_lines(out)))
    print(f"total {time.perf_counter() - t0:.0f}s")
    path = args.json or Path(__file__).parent / "results" / f"bench-scattered-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "scattered": out}, indent=2, default=str))
    print(f"\nJSON: {path}")
    missed = [t for t in out.get("targets", []) if t["met"] is False]
    return 1 if (args.check and missed) else 0


def run_overhead(args, bench: Bench) -> dict:
    """(8) Airflow overhead per chunk; needs the example DAG (see airflow_overhead.py)."""
    if args.skip_airflow or args.skip_overhead:
        flag = "--skip-airflow" if args.skip_airflow else "--skip-overhead"
        return {k: {"skipped": flag} for k in ("airflow_dags_test", "airflow_scheduler")}
    try:
        from benchmarks.airflow_overhead import measure_overhead
    except ImportError as err:
        return {k: {"skipped": f"not available: {err}"} for k in ("airflow_dags_test", "airflow_scheduler")}
    return measure_overhead(args, bench)


def print_report(report: dict) -> None:
    env, cfg = report["environment"], report["config"]
    print()
    print(
        f"benchmark: {cfg['rows']:,} rows over {cfg['days']} days, {cfg['chunks']} chunks ({cfg['chunking']}), "
        f"best of {cfg['repeat']}; {cfg['connections']}"
    )
    print(
        f"environment: {env['cpu']} x{env['cpu_count']}, {env['mem_total_mb']} MB RAM, load {env['loadavg_at_start']} -> "
        f"{env.get('loadavg_at_end')}; PostgreSQL {env['postgresql']} (shared_buffers {env['pg_shared_buffers']}, "
        f"synchronous_commit {env['pg_synchronous_commit']}); Python {env['python']}, psycopg2 {env['psycopg2']}, "
        f"Airflow {env['apache-airflow']}; commit {env['git_commit']}"
    )
    print()
    print("\n".join(table_lines(report["results"])))
    print("\nx(2) = rows/s divided by (2)'s; x(3) = divided by (3)'s for the same phase (first load or rerun).")
    print("targets:")
    print("\n".join(target_lines(report["targets"])))
    if report.get("scattered", {}).get("skipped"):
        print(f"\n(9) time-scattered table end to end: skipped ({report['scattered']['skipped']})")
    elif report.get("scattered"):
        from benchmarks.scattered import report_lines

        print()
        print("\n".join(report_lines(report["scattered"])))
    print(f"total {report['total_seconds']}s")


if __name__ == "__main__":
    sys.exit(main())
