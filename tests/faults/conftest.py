"""Fault-suite harness: real PostgreSQL, a shared invariant checker, a private server to restart.

Every fault test ends with :meth:`Invariants.check`: the destination equals the source over the loaded
range (rows a live writer made newer excepted, and those are byte-for-byte untouched), no duplicate
keys, one ledger row per loaded chunk whose counts match both databases, and the live watermark row
unchanged (same text, same xmin: not even rewritten with equal values).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core.chunks import plan_chunks
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.prepare.watermark import WATERMARK_COLUMNS
from tests import specs
from tests.conftest import REPO


def _pg_bin() -> Path:
    """Where initdb/pg_ctl live: $BACKFILL_TEST_PG_BIN, the newest Debian install, or pg_config --bindir."""
    if os.environ.get("BACKFILL_TEST_PG_BIN"):
        return Path(os.environ["BACKFILL_TEST_PG_BIN"])
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    if debian:
        return debian[-1].parent
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            return Path(out.stdout.strip())
    return Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
RUN_CHUNK = Path(__file__).with_name("run_chunk.py")
DAY1, DAY2 = plan_chunks("2024-01-01", "2024-01-03", "day", "UTC")
BIG_DAY1_ROWS, BIG_DAY2_ROWS = 300_000, 3_000
WATERMARK = "2030-01-01T00:00Z"  # far ahead: the backfill must read it and never touch it


def make_spec(src_url: str, dst_url: str, **extra):
    return specs.make_spec(src_url, dst_url, **{"name": "faults", **extra})


def connect(url: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET TimeZone TO 'UTC'")  # row text (digests) must not depend on the server default
    return conn


def query(url: str, statement, params=None) -> list[tuple]:
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def digest(url: str, lo, hi, *, exclude_ids=(), table: str = "orders") -> tuple[int, str]:
    """(count, md5 of every row in key order) of ``table`` rows with created_at in [lo, hi)."""
    statement = sql.SQL(
        "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) FROM {t} t "
        "WHERE created_at >= %s AND created_at < %s AND NOT (id = ANY (%s))"
    ).format(t=sql.Identifier(table))
    return query(url, statement, (lo, hi, list(exclude_ids)))[0]


def create_destination(dst_url: str) -> None:
    """orders (empty) and the live watermark table with one row, as live ingest would have left them."""
    conn = connect(dst_url)
    create_orders(conn)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS backfill_watermarks ({})").format(sql.SQL(WATERMARK_COLUMNS)))
        cur.execute(
            "INSERT INTO backfill_watermarks (target_table, watermark) VALUES ('public.orders', %s)", (WATERMARK,)
        )
    conn.close()


class Invariants:
    """Snapshot before a fault, :meth:`check` after the retry. ``newer_ids``: rows live ingest made newer."""

    def __init__(self, src_url: str, dst_url: str, *, newer_ids=(), ledger: str = "backfill_ledger"):
        self.src, self.dst, self.newer_ids, self.ledger = src_url, dst_url, list(newer_ids), ledger
        self.watermark = self._watermark()
        self.newer_rows = self._newer()

    def _watermark(self):
        return query(self.dst, "SELECT t::text, xmin::text FROM backfill_watermarks t ORDER BY target_table")

    def _newer(self):
        return query(
            self.dst, "SELECT t::text, xmin::text FROM orders t WHERE id = ANY (%s) ORDER BY id", (self.newer_ids,)
        )

    def ledger_rows(self, chunk=None) -> list[tuple]:
        if query(self.dst, "SELECT to_regclass(%s)", (self.ledger,))[0][0] is None:
            return []
        statement = sql.SQL(
            "SELECT chunk_id, range_start, range_end, rows_extracted, rows_inserted, rows_updated, rows_unchanged, "
            "xmin::text FROM {l} WHERE target_table = 'public.orders' {filter} ORDER BY range_start"
        ).format(l=sql.Identifier(self.ledger), filter=sql.SQL("AND chunk_id = %s" if chunk else ""))
        return query(self.dst, statement, (chunk.chunk_id,) if chunk else None)

    def check(self, chunks) -> None:
        lo, hi = min(c.start for c in chunks), max(c.end for c in chunks)
        # 1. destination equals source over the loaded range, nothing outside it
        assert digest(self.dst, lo, hi, exclude_ids=self.newer_ids) == digest(
            self.src, lo, hi, exclude_ids=self.newer_ids
        ), "destination differs from source"
        outside = query(
            self.dst, "SELECT count(*) FROM orders WHERE NOT (created_at >= %s AND created_at < %s)", (lo, hi)
        )
        assert outside == [(0,)], "rows outside the loaded range"
        # 2. no newer row overwritten (not even rewritten: same xmin)
        assert self._newer() == self.newer_rows, "a newer destination row was overwritten"
        # 3. no duplicate keys
        assert query(self.dst, "SELECT id FROM orders GROUP BY id HAVING count(*) > 1") == []
        # 4. ledger: exactly one row per chunk, counts equal to both databases
        ledger = self.ledger_rows()
        assert [r[0] for r in ledger] == [c.chunk_id for c in sorted(chunks, key=lambda c: c.start)], ledger
        for chunk_id, start, end, extracted, ins, upd, unch, _ in ledger:
            src_n = query(
                self.src, "SELECT count(*) FROM orders WHERE created_at >= %s AND created_at < %s", (start, end)
            )[0][0]
            dst_n = query(
                self.dst, "SELECT count(*) FROM orders WHERE created_at >= %s AND created_at < %s", (start, end)
            )[0][0]
            assert extracted == src_n == dst_n, (chunk_id, extracted, src_n, dst_n)
            assert ins + upd + unch == extracted
        # 5. live watermark untouched
        assert self._watermark() == self.watermark, "the live watermark row changed"


# --- data ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def big_src(databases) -> str:
    """A read-only source shared by the fault tests: 300k orders on 2024-01-01, 3k on 2024-01-02."""
    url = databases.create("fsrc")
    conn = connect(url)
    seed_orders(conn, rows=BIG_DAY1_ROWS, days=1, start=dt.date(2024, 1, 1))
    seed_orders(conn, rows=BIG_DAY2_ROWS, days=1, start=dt.date(2024, 1, 2), first_id=BIG_DAY1_ROWS + 1)
    conn.close()
    return url


def add_live_newer_row(dst_url: str, src_url: str, order_id: int) -> None:
    """Live ingest already wrote a newer version of one order of the chunk: the backfill must keep it."""
    row = query(
        src_url,
        "SELECT id, customer_id, status, amount, created_at, updated_at, note FROM orders WHERE id = %s",
        (order_id,),
    )[0]
    query(
        dst_url,
        "INSERT INTO orders VALUES (%s, %s, 'live-newer', %s, %s, %s + interval '1 day', 'from live ingest')",
        (row[0], row[1], row[3], row[4], row[5]),
    )


# --- processes and sessions ------------------------------------------------------------------------------
def start_chunk_process(spec, chunk) -> subprocess.Popen:
    """Run one chunk in a separate Python process (a worker), printing its result as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(RUN_CHUNK), json.dumps(spec.model_dump(mode="json")), json.dumps(chunk.to_descriptor())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_copy(dst_url: str, appname: str, *, min_tuples: int, done=lambda: False, timeout: float = 60) -> int:
    """Poll the destination's COPY progress of our session until it has taken ``min_tuples`` rows."""
    conn = connect(dst_url)
    deadline = time.monotonic() + timeout
    try:
        with conn.cursor() as cur:
            while time.monotonic() < deadline:
                cur.execute(
                    "SELECT p.tuples_processed FROM pg_stat_progress_copy p JOIN pg_stat_activity a USING (pid) "
                    "WHERE a.application_name = %s AND p.command = 'COPY FROM'",
                    (appname,),
                )
                row = cur.fetchone()
                if row and row[0] >= min_tuples:
                    return row[0]
                if done():
                    raise AssertionError("the chunk finished before the fault could be injected; use more rows")
                time.sleep(0.002)
    finally:
        conn.close()
    raise AssertionError(f"no COPY of {appname!r} seen within {timeout}s")


def wait_sessions_gone(url: str, appname: str, timeout: float = 30) -> float:
    """Seconds until the server has no session of ``appname`` left (it noticed the dead client)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if query(url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (appname,)) == [(0,)]:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"sessions of {appname!r} still present after {timeout}s")


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- a private PostgreSQL server this suite may restart ---------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    """A throwaway PostgreSQL cluster (initdb in a temp dir, its own port), never the shared one."""

    def __init__(self):
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bf_faults_pg_"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root and runuser is missing")
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")

    def start(self) -> None:
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off "
            "-c shared_buffers=16MB -c max_connections=20 -c TimeZone=UTC"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start"
        )

    def restart(self) -> None:
        """Fast shutdown (every session terminated, open transactions rolled back) and start again."""
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "-t", "60", "restart"
        )

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        except Exception:  # noqa: BLE001 - best effort; the directory goes anyway
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def private_pg():
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no initdb in {PG_BIN} (set BACKFILL_TEST_PG_BIN): cannot start a private server to restart")
    server = None
    try:
        server = PrivateServer()
        server.start()
    except (RuntimeError, LookupError, subprocess.TimeoutExpired, OSError) as err:
        if server is not None:
            server.stop()
        pytest.skip(f"cannot start a private PostgreSQL server for the restart test: {err}")
    yield server
    server.stop()
