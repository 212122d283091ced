"""(8) Airflow overhead per chunk: the example DAG over N empty chunks vs a no-op mapped DAG of N task instances.

Both DAGs have the same shape: a plan task, then N mapped classic task instances in the pool
``backfill_source`` (4 slots). The example DAG (``dags/backfill_dags.py`` + ``dags/configs/orders.yaml``)
loads N days in 2030, where the source has no rows, so each chunk does all of its fixed work (connect,
catalog checks, advisory lock, staging, COPY, upsert, ledger) and moves nothing. ``bench_noop_mapped``
(``benchmarks/dags/``) does nothing in every task.

The figure per chunk is the mapped phase of the run, from the end of the plan task to the end of the last
mapped task instance, divided by N (the plan task differs between the two DAGs and is paid once per run).
Measured under ``airflow dags test`` and under a real scheduler (LocalExecutor, api-server, dag-processor),
in a throwaway AIRFLOW_HOME with a throwaway PostgreSQL metadata database. Runs alternate A B B A.
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
import uuid
from pathlib import Path

import psycopg2
from psycopg2 import sql

from benchmarks.rss import ChildFailed, run_isolated
from benchmarks.seed import admin_connect, db_url

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DAG = "backfill_orders"
NOOP_DAG = "bench_noop_mapped"
POOL, POOL_SLOTS = "backfill_source", 4
EMPTY_START = dt.date(2030, 1, 1)  # the seeded source ends in 2025: every chunk from here on is empty


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowSandbox:
    """A private AIRFLOW_HOME, metadata database, dags folder and (optionally) running services."""

    def __init__(self, admin_url: str, src_url: str, dst_url: str, log=print, keep: bool = False):
        """``keep``: leave the metadata database and AIRFLOW_HOME (task and service logs) for inspection."""
        self.admin_url, self.log, self.keep = admin_url, log, keep
        self.meta_db = f"bench_meta_{uuid.uuid4().hex[:10]}"
        self.home = Path(tempfile.mkdtemp(prefix="bench_airflow_"))
        self.dags = self.home / "dags"
        self.port = _free_port()
        self.airflow = str(Path(sys.executable).with_name("airflow"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url(admin_url, self.meta_db).replace(
                "postgresql://", "postgresql+psycopg2://", 1
            ),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW_CONN_BACKFILL_SOURCE_PG": src_url,
            "AIRFLOW_CONN_BACKFILL_DEST_PG": dst_url,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        }

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "AirflowSandbox":
        admin = admin_connect(self.admin_url)
        try:
            with admin.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.meta_db)))
        finally:
            admin.close()
        self.dags.mkdir(parents=True)
        shutil.copy(REPO / "dags" / "backfill_dags.py", self.dags)
        shutil.copytree(REPO / "dags" / "configs", self.dags / "configs")
        shutil.copy(REPO / "benchmarks" / "dags" / f"{NOOP_DAG}.py", self.dags)
        self.cli("db", "migrate", timeout=600)
        self.cli("pools", "set", POOL, str(POOL_SLOTS), "benchmark: source slots")
        return self

    def __exit__(self, *exc) -> None:
        self.stop_services()
        if self.keep:
            self.log(f"kept: AIRFLOW_HOME {self.home}, metadata database {self.meta_db} ({self.admin_url})")
            return
        admin = admin_connect(self.admin_url)
        try:
            with admin.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.meta_db,),
                )
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.meta_db)))
        finally:
            admin.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.airflow, *args], env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"`airflow {' '.join(args)}` failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        return proc

    def start_services(self, timeout: float = 180) -> None:
        for name in ("api-server", "scheduler", "dag-processor"):
            log = open(self.home / f"{name}.log", "wb")
            self.procs[name] = subprocess.Popen(
                [self.airflow, name], env=self.env, cwd=self.home, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"airflow {dead[0]} exited:\n{self.tail(dead[0])}")
            if (
                self._query("SELECT count(*) FROM serialized_dag WHERE dag_id IN (%s, %s)", (EXAMPLE_DAG, NOOP_DAG))[0][
                    0
                ]
                == 2
            ):
                return
            time.sleep(2)
        raise TimeoutError(f"DAGs not parsed within {timeout}s; dag-processor log:\n{self.tail('dag-processor')}")

    def stop_services(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # our own session: the service and its children
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # --- metadata --------------------------------------------------------------------------------
    def _query(self, query: str, params=()) -> list[tuple]:
        conn = psycopg2.connect(db_url(self.admin_url, self.meta_db))
        try:
            with conn.cursor() as cur:
                try:
                    cur.execute(query, params)
                except psycopg2.errors.UndefinedTable:
                    return [(0,)]
                return cur.fetchall()
        finally:
            conn.close()

    def latest_run(self, dag_id: str) -> str | None:
        rows = self._query("SELECT run_id FROM dag_run WHERE dag_id = %s ORDER BY id DESC LIMIT 1", (dag_id,))
        return rows[0][0] if rows and rows[0] else None

    def wait_scheduled_run_created(self, dag_id: str, timeout: float = 120) -> None:
        """A scheduled DAG (catchup off) gets one run for its latest interval when it appears: let it go first.

        Returns at once when no automatic run can come: the DAG's ``next_dagrun_create_after`` is NULL (the
        provider's BackfillOnlyTimetable, or no schedule), as Airflow writes it when it stores the DAG."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self._query(
                "SELECT count(*), count(*) FILTER (WHERE next_dagrun_create_after > now()), "
                "count(*) FILTER (WHERE next_dagrun_create_after IS NULL) FROM dag WHERE dag_id = %s",
                (dag_id,),
            )
            known, created, never = rows[0] if len(rows[0]) == 3 else (0, 0, 0)
            if created:
                return
            if known and never:
                self.log(f"(8) {dag_id}: no automatic run (next_dagrun_create_after is NULL); not waiting for one")
                return
            time.sleep(1)
        self.log(f"(8) no scheduled run of {dag_id} seen within {timeout}s; continuing")

    def wait_idle(self, timeout: float = 300) -> None:
        """No queued or running DAG run (e.g. the scheduled run Airflow creates when a DAG appears)."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline:
            busy = self._query("SELECT count(*) FROM dag_run WHERE state IN ('queued', 'running')")[0][0]
            quiet = quiet + 1 if busy == 0 else 0
            if quiet >= 3:
                return
            time.sleep(1)
        raise TimeoutError(f"DAG runs still active after {timeout}s")

    def figures(self, dag_id: str, run_id: str) -> dict:
        ((state, start, end),) = self._query(
            "SELECT state, start_date, end_date FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id)
        )
        tis = self._query(
            "SELECT task_id, state, start_date, end_date, duration FROM task_instance WHERE dag_id = %s AND run_id = %s",
            (dag_id, run_id),
        )
        mapped = [t for t in tis if t[0] == "load_chunk"]
        plan = [t for t in tis if t[0] == "plan"]
        # only plan and the mapped chunks are compared; a later task (the example's validate) may not gate it
        bad = sorted({t[1] for t in mapped + plan if t[1] != "success"})
        if bad or not mapped or not plan:
            raise RuntimeError(f"{dag_id} run {run_id}: run {state}, plan/load_chunk states {bad or 'missing'}")
        others = {t[0]: t[1] for t in tis if t[0] not in ("plan", "load_chunk")}
        phase = (max(t[3] for t in mapped) - plan[0][3]).total_seconds()
        return {
            "run_state": state,
            "other_tasks": others,
            "run_seconds": (end - start).total_seconds(),
            "mapped_phase_seconds": phase,
            "task_instances": len(mapped),
            "per_chunk_seconds": phase / len(mapped),
            "avg_ti_duration": sum(t[4] or 0 for t in mapped) / len(mapped),
            "plan_seconds": plan[0][4],
        }

    # --- the two ways of running -----------------------------------------------------------------
    def dags_test(self, dag_id: str, conf: dict) -> dict:
        before = self.latest_run(dag_id)
        proc = self.cli("dags", "test", dag_id, "--conf", json.dumps(conf), timeout=900, check=False)
        run_id = self.latest_run(dag_id)
        if run_id is None or run_id == before:  # a failed later task is judged by figures(), not the exit code
            raise RuntimeError(f"`airflow dags test {dag_id}` created no run:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return self.figures(dag_id, run_id)

    def trigger(self, dag_id: str, conf: dict, timeout: float = 900) -> dict:
        self.wait_idle()
        run_id = f"bench__{uuid.uuid4().hex[:12]}"
        self.cli("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self._query("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id))
            if rows and rows[0] and rows[0][0] in ("success", "failed"):
                return self.figures(dag_id, run_id)
            time.sleep(1)
        raise TimeoutError(
            f"{dag_id} run {run_id} not finished after {timeout}s; scheduler log:\n{self.tail('scheduler')}"
        )


def _compare(runner, n: int, reps: int = 2) -> dict:
    """A B B A ...: the example DAG and the no-op DAG alternately; the best mapped phase of each."""
    end = EMPTY_START + dt.timedelta(days=n)
    confs = {
        EXAMPLE_DAG: {"start": EMPTY_START.isoformat(), "end": end.isoformat(), "reprocess": True},
        NOOP_DAG: {"n": n},
    }
    order = []
    for rep in range(reps):
        order += [EXAMPLE_DAG, NOOP_DAG] if rep % 2 == 0 else [NOOP_DAG, EXAMPLE_DAG]
    runs: dict[str, list[dict]] = {EXAMPLE_DAG: [], NOOP_DAG: []}
    for dag_id in order:
        runs[dag_id].append(runner(dag_id, confs[dag_id]))
    best = {d: min(r, key=lambda f: f["per_chunk_seconds"]) for d, r in runs.items()}
    return {
        "chunks": n,
        "seconds": best[EXAMPLE_DAG]["per_chunk_seconds"],
        "noop_seconds": best[NOOP_DAG]["per_chunk_seconds"],
        "raw_ratio": best[EXAMPLE_DAG]["per_chunk_seconds"] / best[NOOP_DAG]["per_chunk_seconds"],
        "example": best[EXAMPLE_DAG],
        "noop": best[NOOP_DAG],
        "all_runs": runs,
        "repetitions": reps,
    }


def _net(row: dict, work_s: float | None, concurrency: int) -> None:
    """Airflow's own cost per chunk = wall time per chunk minus the chunk's DB work (measured without Airflow,
    spread over the task instances that run at once); compared with the no-op task instance's."""
    ex, noop = row["seconds"], row["noop_seconds"]
    row["concurrency"] = concurrency
    if work_s is None:
        row["ratio"] = row["raw_ratio"]
        row["note"] = f"s/chunk: ours {ex:.3f} vs no-op {noop:.3f} (raw; our path alone not measured)"
        return
    row["empty_chunk_work_seconds"] = work_s
    row["ratio"] = (ex - work_s / concurrency) / noop
    row["note"] = (
        f"s/chunk: ours {ex:.3f} vs no-op {noop:.3f} = {row['raw_ratio']:.2f}x raw; "
        f"minus our DB work {work_s * 1000:.0f} ms/{concurrency}: {row['ratio']:.2f}x; "
        f"avg TI {row['example']['avg_ti_duration']:.3f} vs {row['noop']['avg_ti_duration']:.3f} s"
    )


def dag_parse_seconds(sandbox: "AirflowSandbox", reps: int = 3) -> dict:
    """Parse time of each DAG file in a process that has Airflow loaded (what every task process pays once)."""
    code = (
        "import runpy, sys, time\n"
        "import airflow.sdk, airflow.providers.common.compat.sdk\n"
        "from airflow.sdk.execution_time import task_runner\n"
        "t = time.perf_counter(); runpy.run_path(sys.argv[1]); print(time.perf_counter() - t)\n"
    )
    out = {}
    for name, path in (("example", sandbox.dags / "backfill_dags.py"), ("noop", sandbox.dags / f"{NOOP_DAG}.py")):
        times = []
        for _ in range(reps):
            proc = subprocess.run(
                [sys.executable, "-c", code, str(path)], env=sandbox.env, capture_output=True, text=True, timeout=120
            )
            if proc.returncode == 0 and proc.stdout.strip():
                times.append(float(proc.stdout.strip().splitlines()[-1]))
        out[name] = min(times) if times else None
    return out


def empty_chunk_work(src_url: str, dst_url: str, n: int) -> dict:
    """Our transfer path alone over the same N empty days: the work an empty chunk adds to a task instance."""
    chunks = [
        {
            "chunk_id": (EMPTY_START + dt.timedelta(days=i)).isoformat(),
            "start": dt.datetime.combine(EMPTY_START + dt.timedelta(days=i), dt.time(), dt.timezone.utc).isoformat(),
            "end": dt.datetime.combine(EMPTY_START + dt.timedelta(days=i + 1), dt.time(), dt.timezone.utc).isoformat(),
        }
        for i in range(n)
    ]
    # with what the example DAG's plan task hands its chunks: the prepared run
    from benchmarks.ours import as_planned, spec_dict

    spec = spec_dict()
    chunks, _ = as_planned(spec, src_url, dst_url, chunks)
    r = run_isolated("ours", {"src_url": src_url, "dst_url": dst_url, "chunks": chunks, "spec": spec})
    return {"seconds_per_chunk": r["seconds"] / n, "chunks": n}


def measure_overhead(args, bench) -> dict:
    n = args.overhead_chunks
    out: dict[str, dict] = {}
    from benchmarks import dest

    dest.fresh_table(bench.dst)  # the example DAG checks the destination table before any chunk
    try:
        work = empty_chunk_work(bench.src, bench.dst, n)["seconds_per_chunk"]
        bench.log(f"(8) our path alone, {n} empty chunks: {work * 1000:.1f} ms per chunk")
    except ChildFailed as err:
        bench.log(f"(8) our path alone failed: {str(err).splitlines()[-1]}")
        work = None
    parse = None
    try:
        with AirflowSandbox(args.admin_url, bench.src, bench.dst, log=bench.log) as sandbox:
            parse = dag_parse_seconds(sandbox)
            bench.log(f"(8) airflow dags test: example DAG vs no-op mapped DAG, {n} chunks")
            out["airflow_dags_test"] = _compare(sandbox.dags_test, n)
            _net(out["airflow_dags_test"], work, 1)  # dags test runs task instances one at a time
            bench.log(f"(8) scheduler + {POOL_SLOTS}-slot pool: starting api-server, scheduler, dag-processor")
            sandbox.start_services()
            sandbox.wait_scheduled_run_created(EXAMPLE_DAG)
            sandbox.wait_idle()
            out["airflow_scheduler"] = _compare(sandbox.trigger, n)
            _net(out["airflow_scheduler"], work, min(POOL_SLOTS, n))
    except Exception as err:  # noqa: BLE001 - report what was measured; say what failed and where
        bench.log(f"(8) failed: {err}")
        for key in ("airflow_dags_test", "airflow_scheduler"):
            out.setdefault(key, {"skipped": f"failed: {str(err).splitlines()[0][:150]}"})
    for key in ("airflow_dags_test", "airflow_scheduler"):
        if "ratio" in out[key] and parse:
            out[key]["dag_parse_seconds"] = parse
            if parse.get("example") is not None and parse.get("noop") is not None:
                out[key]["note"] += f"; DAG file parse {parse['example'] * 1000:.0f} vs {parse['noop'] * 1000:.0f} ms"
    return out
