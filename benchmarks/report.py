"""The environment a run happened in, the one results table, and the target checks."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import psycopg2

#: (key, label) in table order; every key appears in the JSON, measured or with the reason it was skipped
ROWS = [
    ("physical", "(2) COPY pipe -> empty table (physical limit)"),
    ("reference_first", "(3) reference COPY->stage->upsert, first load"),
    ("reference_rerun", "(3) reference, rerun (nothing changed)"),
    ("ours_first", "(1) ours (load probe + transfer_chunk), first load"),
    ("ours_rerun", "(1) ours, rerun (nothing changed)"),
    ("naive_first", "(4) naive loop fetchall+execute_values, first load"),
    ("generic_transfer", "(5) Airflow GenericTransfer/insert_rows (sample)"),
    ("generic_transfer_af2", "(5) the same on Airflow 2.11 (psycopg2 executemany)"),
    ("ours_rss_10k", "(7) ours, one chunk of ~10k rows"),
    ("ours_rss_100k", "(7) ours, one chunk of ~100k rows"),
    ("ours_rss_1m", "(7) ours, one chunk of ~1M rows"),
    ("idle_ours", "    floor: python + our imports, no work"),
    ("airflow_dags_test", "(8) example DAG vs no-op mapped, `airflow dags test`"),
    ("airflow_scheduler", "(8) example DAG vs no-op mapped, scheduler + 4-slot pool"),
]

TARGETS = {
    "ours_vs_reference_first": 0.95,
    "ours_vs_reference_rerun": 0.95,
    "rerun_rows_rewritten": 0,
    "ours_vs_naive": 5.0,
    "ours_vs_generic_transfer": 30.0,
    "rss_1m_rows_mb": 120.0,
    "airflow_overhead_ratio": 1.1,
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(admin_url: str) -> dict:
    env = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "mem_total_mb": _mem_total_mb(),
        "psycopg2": psycopg2.__version__.split()[0],
        "apache-airflow": _version("apache-airflow"),
        "apache-airflow-providers-postgres": _version("apache-airflow-providers-postgres"),
        "git_commit": _git_commit(),
    }
    conn = psycopg2.connect(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            env["postgresql"] = cur.fetchone()[0]
            for setting in ("shared_buffers", "synchronous_commit", "max_wal_size", "work_mem"):
                cur.execute("SELECT current_setting(%s)", (setting,))
                env[f"pg_{setting}"] = cur.fetchone()[0]
            cur.execute("SELECT inet_server_addr()::text")
            env["pg_host"] = cur.fetchone()[0] or "unix socket"
    finally:
        conn.close()
    return env


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table_lines(results: dict) -> list[str]:
    header = f"{'measurement':<56} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'RSS MB':>7} {'x(2)':>6} {'x(3)':>6}  note"
    lines = [header, "-" * len(header)]
    for key, label in ROWS:
        r = results.get(key, {})
        if r.get("skipped"):
            lines.append(f"{label:<56} {'skipped: ' + r['skipped']}")
            continue
        if "ratio" in r:  # (8): "rows" is N chunks, seconds are per chunk, compared with the no-op mapped DAG
            lines.append(
                f"{label:<56} {_fmt(r.get('chunks'), 'd'):>9} {_fmt(r.get('seconds'), '.2f'):>8} {'':>9} {'':>7} "
                f"{'':>6} {'':>6}  {r.get('note', '')}"
            )
            continue
        lines.append(
            f"{label:<56} {_fmt(r.get('rows'), 'd'):>9} {_fmt(r.get('seconds'), '.2f'):>8} "
            f"{_fmt(r.get('rows_per_s'), ',.0f'):>9} {_fmt(r.get('peak_rss_mb'), '.0f'):>7} "
            f"{_fmt(r.get('x_physical'), '.2f'):>6} {_fmt(r.get('x_reference'), '.2f'):>6}  {r.get('note', '')}"
        )
    return lines


def target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        status = {True: "PASS", False: "MISS", None: "n/a "}[t["met"]]
        value = t["value"] if isinstance(t["value"], (int, type(None))) else round(t["value"], 3)
        lines.append(f"  [{status}] {t['name']:<28} {value!s:>10}  target {t['op']} {t['target']}  {t.get('note', '')}")
    return lines
