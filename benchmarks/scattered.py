"""(9) End to end on a time-scattered table: the whole backfill under a real scheduler vs the tools users
would pick instead (issue 15).

The table ``orders_wide`` is generated (no downloads): wide orders-like rows with addresses and comments,
``id`` in physical order and ``created_at`` scattered over the range by a multiplicative hash of ``id``,
so ``pg_stats.correlation`` of the time column is near 0: a time chunk reads pages from all over the
table, as on a real table whose rows were updated, migrated or loaded out of order.

Every path loads the whole table into an empty destination table with the same keys, on the same run:

- COPY pipe: one bare binary ``COPY (SELECT ...) TO STDOUT`` -> ``COPY ... FROM STDIN``: the physical limit
- ours: the backfill DAG (the project's loader + a generated YAML spec, default chunking) triggered
  once over the whole range, run by a real scheduler (LocalExecutor, api-server, dag-processor,
  triggerer; PostgreSQL metadata database; 4-slot pool), wall time of the DAG run (plan, every chunk,
  validation)
- Sling (``sling-linux-amd64`` from PyPI): ``--mode incremental --primary-key id --update-key updated_at``
- dlt (``dlt[postgres,sql_database,parquet]``): ``sql_table(backend="pyarrow")`` with
  ``write_disposition="merge"``, ``primary_key="id"`` into postgres
- the fixed database work of one empty chunk of ours (probe + transfer, no Airflow), in ms

Peers are optional (``pip install -e '.[bench]'``): a missing one is reported as skipped, never fatal.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
from psycopg2 import sql

from benchmarks.seed import DEFAULT_START
from benchmarks.ours import as_planned

TABLE = "orders_wide"
COLUMNS = (
    "id",
    "customer_id",
    "status",
    "currency",
    "amount",
    "discount",
    "items",
    "created_at",
    "updated_at",
    "shipping_city",
    "shipping_address",
    "comment",
)
DDL = """
CREATE TABLE {t} (
    id               bigint        NOT NULL,
    customer_id      bigint        NOT NULL,
    status           text          NOT NULL,
    currency         char(3)       NOT NULL,
    amount           numeric(12,2) NOT NULL,
    discount         numeric(6,2),
    items            integer       NOT NULL,
    created_at       timestamptz   NOT NULL,
    updated_at       timestamptz   NOT NULL,
    shipping_city    text,
    shipping_address text,
    comment          text
)"""


def create_table(cur, table: str = TABLE, *, keys: bool = True) -> None:
    cur.execute(sql.SQL(DDL).format(t=sql.Identifier(table)))
    if keys:
        add_keys(cur, table)


def add_keys(cur, table: str = TABLE) -> None:
    cur.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(sql.Identifier(table)))
    cur.execute(
        sql.SQL("CREATE INDEX {} ON {} (created_at)").format(
            sql.Identifier(f"{table}_created_at_idx"), sql.Identifier(table)
        )
    )


def _autocommit(url: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def seed(src_url: str, rows: int, days: int, start: dt.datetime = DEFAULT_START) -> dict:
    """``rows`` rows, ``created_at`` scattered over ``[start, start + days)``; returns correlation and size."""
    conn = _autocommit(src_url)
    span = days * 86400
    try:
        with conn.cursor() as cur:
            create_table(cur, keys=False)
            cur.execute(
                sql.SQL(
                    """
                    INSERT INTO {t}
                    SELECT i,
                           1 + (i * 7919) %% 200000,
                           (ARRAY['new','paid','shipped','delivered','cancelled','refunded'])[1 + i %% 6],
                           (ARRAY['EUR','USD','GBP','CHF'])[1 + i %% 4],
                           ((i * 37) %% 100000) / 100.0,
                           CASE WHEN i %% 7 = 0 THEN ((i * 13) %% 5000) / 100.0 END,
                           1 + i %% 9,
                           c.at,
                           c.at + (i %% 240) * interval '1 hour',
                           (ARRAY['Berlin','Lyon','Porto','Leeds','Graz','Turin','Ghent','Malmo'])[1 + i %% 8],
                           (i %% 997) || ' ' || substr(md5(i::text), 1, 10) || ' Street, apt ' || (i %% 61),
                           CASE WHEN i %% 4 = 0 THEN NULL
                                ELSE 'customer comment: ' || repeat(md5((i * 31)::text) || ' ', (1 + i %% 4)::int) END
                    FROM generate_series(1, %(rows)s::bigint) AS i,
                         LATERAL (SELECT %(start)s::timestamptz
                                         + ((i * 2654435761) %% %(span)s) * interval '1 second' AS at) AS c"""
                ).format(t=sql.Identifier(TABLE)),
                {"rows": rows, "start": start, "span": span},
            )
            add_keys(cur)
            cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(TABLE)))
            cur.execute("SELECT correlation FROM pg_stats WHERE tablename = %s AND attname = 'created_at'", (TABLE,))
            corr = cur.fetchone()[0]
            cur.execute("SELECT pg_total_relation_size(%s), pg_relation_size(%s)", (TABLE, TABLE))
            total, heap = cur.fetchone()
    finally:
        conn.close()
    return {
        "rows": rows,
        "days": days,
        "created_at_correlation": round(corr, 4),
        "heap_mb": round(heap / 2**20, 1),
        "total_mb": round(total / 2**20, 1),
    }


def fresh_destination(dst_url: str, table: str = TABLE, drop_schemas=("dlt_bench",)) -> None:
    conn = _autocommit(dst_url)
    try:
        with conn.cursor() as cur:
            for name in (table, "backfill_ledger", "backfill_validation"):
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            for schema in drop_schemas:
                cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            create_table(cur, table)
            try:
                cur.execute("CHECKPOINT")
            except psycopg2.errors.InsufficientPrivilege:
                pass
    finally:
        conn.close()


def count(url: str, table: str = TABLE, schema: str = "public") -> int:
    conn = _autocommit(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table)))
            return cur.fetchone()[0]
    finally:
        conn.close()


# --- the paths ------------------------------------------------------------------------------------


def copy_pipe(src_url: str, dst_url: str) -> dict:
    """The physical limit: the whole table through one binary COPY pipe into the empty keyed table."""
    from benchmarks.baselines import copy_pipe as pipe

    cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    out = sql.SQL("COPY (SELECT {c} FROM {t}) TO STDOUT (FORMAT binary)").format(c=cols, t=sql.Identifier(TABLE))
    inp = sql.SQL("COPY {t} ({c}) FROM STDIN (FORMAT binary)").format(c=cols, t=sql.Identifier(TABLE))
    t0 = time.perf_counter()
    src, dst = psycopg2.connect(src_url), psycopg2.connect(dst_url)
    try:
        with src.cursor() as sc, dst.cursor() as dc:
            n = pipe(sc, dc, out, inp)
        dst.commit()
    finally:
        src.close()
        dst.close()
    return {"rows": n, "seconds": time.perf_counter() - t0}


def sling_binary() -> str | None:
    if os.environ.get("SLING_BINARY"):
        return os.environ["SLING_BINARY"]
    try:  # the wheel sling-linux-amd64 carries the binary; the `sling` wrapper may want another version
        import sling_linux_amd64

        if sling_linux_amd64.SLING_BIN and Path(sling_linux_amd64.SLING_BIN).exists():
            return sling_linux_amd64.SLING_BIN
    except ImportError:
        pass
    return shutil.which("sling")


def sling(src_url: str, dst_url: str, *, mode: str = "incremental") -> dict:
    binary = sling_binary()
    if not binary:
        return {"skipped": "sling not installed (pip install -e '.[bench]')"}
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    env = {
        **os.environ,
        "BENCH_SRC": src_url + "?sslmode=disable",
        "BENCH_DST": dst_url + "?sslmode=disable",
        "SLING_HOME_DIR": tempfile.mkdtemp(prefix="bench_sling_"),
        "SLING_DISABLE_TELEMETRY": "true",
    }
    argv = [
        binary,
        "run",
        "--src-conn",
        "BENCH_SRC",
        "--src-stream",
        f"public.{TABLE}",
        "--tgt-conn",
        "BENCH_DST",
        "--tgt-object",
        f"public.{TABLE}",
        "--mode",
        mode,
    ]
    if mode == "incremental":
        argv += ["--primary-key", "id", "--update-key", "updated_at"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    shutil.rmtree(env["SLING_HOME_DIR"], ignore_errors=True)
    if proc.returncode != 0:
        return {"skipped": f"sling failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-300:]}"}
    return {"rows": count(dst_url), "seconds": seconds, "version": version.replace("Version: ", "")}


DLT_CHILD = r"""
import json, sys, time
src, dst, table, pipelines_dir, out = sys.argv[1:6]
import dlt
from dlt.sources.sql_database import sql_table
t0 = time.perf_counter()
res = sql_table(credentials=src, table=table, backend="pyarrow")
res.apply_hints(primary_key="id", write_disposition="merge")
p = dlt.pipeline(pipeline_name="bench_dlt", destination=dlt.destinations.postgres(credentials=dst),
                 dataset_name="dlt_bench", pipelines_dir=pipelines_dir)
p.run(res)
json.dump({"seconds": time.perf_counter() - t0, "version": dlt.__version__}, open(out, "w"))
"""


def dlt(src_url: str, dst_url: str) -> dict:
    try:
        import dlt as _  # noqa: F401
    except ImportError:
        return {"skipped": "dlt not installed (pip install -e '.[bench]')"}
    tmp = Path(tempfile.mkdtemp(prefix="bench_dlt_"))
    # dlt's postgres destination insists on a password even under trust auth: any will do there
    dst = dst_url.replace("postgresql://postgres@", "postgresql://postgres:bench@", 1)
    src = src_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    env = {**os.environ, "DLT_DATA_DIR": str(tmp), "RUNTIME__DLTHUB_TELEMETRY": "false", "DLT_PROJECT_DIR": str(tmp)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", DLT_CHILD, src, dst, TABLE, str(tmp / "pipelines"), str(tmp / "out.json")],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    seconds = time.perf_counter() - t0  # the process, imports included, as a user runs it
    try:
        if proc.returncode != 0:
            return {"skipped": f"dlt failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-300:]}"}
        inner = json.loads((tmp / "out.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "rows": count(dst_url, schema="dlt_bench"),
        "seconds": seconds,
        "seconds_in_run": inner["seconds"],
        "version": inner["version"],
    }


def spec_dict(src_conn: str = "backfill_source_pg", dst_conn: str = "backfill_dest_pg", **over) -> dict:
    """The spec a user writes for the scattered table; chunking: ``granularity: auto`` (sized from the source's
    statistics; on this table it picks ranges of ``id``, see docs/chunking.md). The spec's default is ``day``."""
    return {
        "name": "bench_wide",
        "source_conn_id": src_conn,
        "destination_conn_id": dst_conn,
        "source_table": f"public.{TABLE}",
        "destination_table": f"public.{TABLE}",
        "time_column": "created_at",
        "key_columns": ["id"],
        "version_column": "updated_at",
        "granularity": "auto",
        "timezone": "UTC",
        "start_date": "2023-01-01",
        "pool": "backfill_source",
        "watermark": {"enabled": False},
        "validation": {"sum_columns": ["amount"]},
        **over,
    }


def fixed_cost(src_url: str, dst_url: str, n: int = 50) -> dict:
    """Median database work of an empty chunk of ours (probe + transfer), no Airflow: ms per chunk."""
    from benchmarks.rss import run_isolated

    day = dt.date(2031, 1, 1)
    chunks = [
        {
            "chunk_id": f"empty-{i}",
            "start": dt.datetime.combine(day + dt.timedelta(days=i), dt.time(), dt.timezone.utc).isoformat(),
            "end": dt.datetime.combine(day + dt.timedelta(days=i + 1), dt.time(), dt.timezone.utc).isoformat(),
        }
        for i in range(n)
    ]
    spec = spec_dict("bench_src", "bench_dst")
    chunks, handover = as_planned(spec, src_url, dst_url, chunks)  # as the DAG's chunks: the plan's prepared run
    r = run_isolated("ours", {"src_url": src_url, "dst_url": dst_url, "chunks": chunks, "spec": spec})
    per = sorted(c["seconds"] for c in r["per_chunk"])
    probe_ms = 1000 * r["probe_seconds"] / n
    # the same empty chunks inside one batch (above max_mapped_chunks): sessions, staging table and checks kept
    b = run_isolated("ours_batch", {"src_url": src_url, "dst_url": dst_url, "chunks": chunks, "spec": spec})
    in_batch = sorted(c["seconds"] for c in b["per_chunk"][1:])  # the first one checks the fingerprints
    return {
        "chunks": n,
        "median_ms": 1000 * per[len(per) // 2] + probe_ms,
        "mean_ms": 1000 * r["seconds"] / n,
        "probe_ms": probe_ms,
        "in_batch_median_ms": 1000 * in_batch[len(in_batch) // 2] if in_batch else None,
        "handover": handover,  # the prepared run in each descriptor: JSON bytes, ms to decode
    }


def key_range_path(src_url: str, dst_url: str, start: dt.date, end: dt.date) -> dict:
    """Our chunk path (probe + transfer_chunk per chunk, sessions per chunk) over the key ranges the plan cuts
    (``chunk_by: key``, default target size), one after the other without Airflow: the whole table."""
    from airflow_backfill_provider.plan.planning import build_plan
    from airflow_backfill_provider.core.spec import load_spec
    from benchmarks.rss import run_isolated

    spec = spec_dict("bench_src", "bench_dst", chunk_by="key")
    src, dst = psycopg2.connect(src_url), psycopg2.connect(dst_url)
    try:
        plan = build_plan(load_spec(spec), start.isoformat(), end.isoformat(), src_conn=src, dst_conn=dst)
    finally:
        src.close()
        dst.close()
    chunks, _ = as_planned(spec, src_url, dst_url, [c.to_descriptor() for c in plan.chunks])
    r = run_isolated("ours", {"src_url": src_url, "dst_url": dst_url, "chunks": chunks, "spec": spec})
    return {"rows": count(dst_url), "seconds": r["seconds"], "chunks": len(chunks), "state": "direct"}


# --- one run of (9) -------------------------------------------------------------------------------

TARGETS = {"ours_vs_sling_incremental": 1.5, "ours_vs_dlt": 2.0, "fixed_cost_ms": 15.0, "key_range_vs_copy": 0.5}


def measure(args, log) -> dict:
    """Seed the scattered table in fresh databases, run every path, return figures, ratios and targets."""
    from benchmarks.sandbox import run_backfill
    from benchmarks.seed import Databases

    dbs = Databases(args.admin_url)
    out: dict = {}
    try:
        src, dst = dbs.create()
        log(f"(9) seeding {args.scattered_rows:,} time-scattered rows over {args.scattered_days} days")
        out["table"] = seed(src, args.scattered_rows, args.scattered_days)
        log(f"(9) table: {out['table']}")
        paths = {}

        def run(key, fn, *a, schema="public", **kw):
            fresh_destination(dst)
            log(f"(9) {key}")
            try:
                r = fn(*a, **kw)
            except Exception as err:  # one failed path is reported, the others still run  # noqa: BLE001 - best effort: never fails the task
                r = {"skipped": f"failed: {str(err).splitlines()[0][:200]}"}
            if "rows" in r:
                r["rows_per_s"] = r["rows"] / r["seconds"] if r["seconds"] else None
                r["complete"] = r["rows"] == args.scattered_rows
            paths[key] = r
            log(f"(9) {key}: {r}")

        run("copy_pipe", copy_pipe, src, dst)
        if args.skip_peers:
            paths["sling_incremental"] = paths["dlt_merge"] = {"skipped": "--skip-peers"}
        else:
            run("sling_incremental", sling, src, dst)
            run("dlt_merge", dlt, src, dst)
        if args.skip_airflow:
            paths["ours_scheduler"] = paths["ours_scheduler_budget_off"] = {"skipped": "--skip-airflow"}
        else:
            start = DEFAULT_START.date()
            conf = {"start": start.isoformat(), "end": (start + dt.timedelta(days=args.scattered_days)).isoformat()}

            def ours(**over):
                f = run_backfill(args.admin_url, src, dst, spec_dict(**over), conf, log=log)
                return {
                    "rows": count(dst),
                    "seconds": f["run_seconds"],
                    "chunks": f["chunks"],
                    "state": f["state"],
                    "tasks": f["tasks"],
                    "timeline": f["timeline"],  # [task, map_index, queued, start, end] seconds into the run
                    "warm_up_seconds": f["warm_up_seconds"],  # the untimed first run (sandbox.run_backfill)
                }

            run("ours_scheduler", ours)
            # the same without the latency budget (on by default since issue 23): here source, destination and
            # Airflow's metadata DB share one server, so the budget also reads the destination's own writes
            # slowing Airflow's transactions; Sling and dlt have no budget; and the release before had it off
            run("ours_scheduler_budget_off", ours, throttle={"max_latency_ratio": None})
        start = DEFAULT_START.date()
        run("key_ranges", key_range_path, src, dst, start, start + dt.timedelta(days=args.scattered_days))
        fresh_destination(dst)
        try:
            paths["fixed_cost"] = fixed_cost(src, dst)
        except Exception as err:  # noqa: BLE001 - best effort: never fails the task
            paths["fixed_cost"] = {"skipped": f"failed: {str(err).splitlines()[-1][:200]}"}
        out["paths"] = paths
    finally:
        if not args.keep:
            dbs.drop()
    out["targets"] = targets(out["paths"])
    return out


def targets(p: dict) -> list[dict]:
    def rate(k):
        return p.get(k, {}).get("rows_per_s") if p.get(k, {}).get("complete") else None

    def ratio(a, b):
        return rate(a) / rate(b) if rate(a) and rate(b) else None

    rows = [
        {"name": "ours_vs_sling_incremental", "value": ratio("ours_scheduler", "sling_incremental"), "op": ">="},
        {"name": "ours_vs_dlt", "value": ratio("ours_scheduler", "dlt_merge"), "op": ">="},
        {"name": "fixed_cost_ms", "value": p.get("fixed_cost", {}).get("median_ms"), "op": "<="},
        {"name": "key_range_vs_copy", "value": ratio("key_ranges", "copy_pipe"), "op": ">="},
        {"name": "  ours_vs_copy_pipe (info)", "value": ratio("ours_scheduler", "copy_pipe"), "op": "info"},
        {
            "name": "  budget off: ours_vs_sling (info)",
            "value": ratio("ours_scheduler_budget_off", "sling_incremental"),
            "op": "info",
        },
        {
            "name": "  budget off: ours_vs_dlt (info)",
            "value": ratio("ours_scheduler_budget_off", "dlt_merge"),
            "op": "info",
        },
    ]
    for t in rows:
        t["target"] = TARGETS.get(t["name"])
        v = t["value"]
        t["met"] = (
            None if v is None or t["op"] == "info" else (v >= t["target"] if t["op"] == ">=" else v <= t["target"])
        )
    return rows


LABELS = [
    ("copy_pipe", "COPY pipe, whole table (physical limit)"),
    ("sling_incremental", "Sling incremental merge (primary + update key)"),
    ("dlt_merge", "dlt sql_database -> postgres, merge, pyarrow"),
    ("ours_scheduler", "ours, whole backfill, real scheduler, pool 4"),
    ("ours_scheduler_budget_off", "  the same, latency budget off (max_latency_ratio: null)"),
    ("key_ranges", "ours, key-range chunks one by one, no Airflow"),
]


def report_lines(out: dict) -> list[str]:
    t = out.get("table", {})
    lines = [
        f"(9) time-scattered table {TABLE}: {t.get('rows', 0):,} rows over {t.get('days')} days, "
        f"created_at correlation {t.get('created_at_correlation')}, heap {t.get('heap_mb')} MB "
        f"(total {t.get('total_mb')} MB with indexes)",
        f"{'path':<52} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'x COPY':>7}  note",
    ]
    p = out.get("paths", {})
    copy = p.get("copy_pipe", {}).get("rows_per_s")
    for key, label in LABELS:
        r = p.get(key, {})
        if r.get("skipped"):
            lines.append(f"{label:<52} skipped: {r['skipped']}")
            continue
        note = []
        if r.get("version"):
            note.append(f"v{r['version']}")
        if r.get("chunks"):
            note.append(f"{r['chunks']} chunks, run {r.get('state')}")
        if r.get("complete") is False:
            note.append("INCOMPLETE")
        x = r["rows_per_s"] / copy if copy and r.get("rows_per_s") else None
        lines.append(
            f"{label:<52} {r['rows']:>9} {r['seconds']:>8.1f} {r['rows_per_s']:>9,.0f} "
            f"{'-' if x is None else format(x, '.2f'):>7}  {'; '.join(note)}"
        )
    fc = p.get("fixed_cost", {})
    if fc.get("skipped"):
        lines.append(f"{'fixed database work per empty chunk':<52} skipped: {fc['skipped']}")
    elif fc:
        lines.append(
            f"{'fixed database work per empty chunk (no Airflow)':<52} median {fc['median_ms']:.1f} ms "
            f"(mean {fc['mean_ms']:.1f} ms, of which probe {fc['probe_ms']:.1f} ms; {fc['chunks']} chunks)"
        )
        if fc.get("in_batch_median_ms") is not None:
            lines.append(
                f"{'  the same chunks inside one batch (sessions kept)':<52} median {fc['in_batch_median_ms']:.1f} ms "
                "(information: the target is the chunk on its own)"
            )
    lines.append("targets (issue 15), ratios from this run:")
    for tg in out.get("targets", []):
        status = {True: "MET ", False: "MISS", None: "n/a "}[tg["met"]]
        v = tg["value"]
        v = "-" if v is None else f"{v:.2f}"
        tgt = "" if tg["target"] is None else f"target {tg['op']} {tg['target']}"
        lines.append(f"  [{status}] {tg['name']:<28} {v:>8}  {tgt}  {tg.get('note', '')}")
    return lines
