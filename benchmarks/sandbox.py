"""A real Airflow (LocalExecutor scheduler, api-server, dag-processor, triggerer) running the project's
backfill DAG file over specs the bench writes: the whole backfill, end to end, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import yaml

from benchmarks.airflow_overhead import POOL, POOL_SLOTS, REPO, AirflowSandbox
from benchmarks.seed import admin_connect

from psycopg2 import sql


class BackfillSandbox(AirflowSandbox):
    """``specs``: the YAML specs (dicts) to put in the DAG folder's configs/, one DAG each."""

    def __init__(self, admin_url: str, src_url: str, dst_url: str, specs: list[dict], log=print, keep: bool = False):
        super().__init__(admin_url, src_url, dst_url, log=log, keep=keep)
        self.specs = specs
        self.dag_ids = [s.get("dag_id") or f"backfill_{s['name']}" for s in specs]

    def __enter__(self) -> "BackfillSandbox":
        admin = admin_connect(self.admin_url)
        try:
            with admin.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.meta_db)))
        finally:
            admin.close()
        (self.dags / "configs").mkdir(parents=True)
        shutil.copy(REPO / "dags" / "backfill_dags.py", self.dags)
        for spec in self.specs:
            (self.dags / "configs" / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
        self.env["AIRFLOW_BACKFILL_STRICT"] = "1"
        self.cli("db", "migrate", timeout=600)
        self.cli("pools", "set", POOL, str(POOL_SLOTS), "benchmark: source slots", "--include-deferred")
        return self

    def start_services(self, timeout: float = 240) -> None:
        for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
            log = open(self.home / f"{name}.log", "wb")
            self.procs[name] = subprocess.Popen(
                [self.airflow, name], env=self.env, cwd=self.home, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"airflow {dead[0]} exited:\n{self.tail(dead[0])}")
            got = self._query("SELECT count(*) FROM serialized_dag WHERE dag_id = ANY(%s)", (self.dag_ids,))[0][0]
            if got == len(self.dag_ids):
                for dag_id in self.dag_ids:
                    self.wait_scheduled_run_created(dag_id, timeout=60)
                self.wait_idle()
                return
            time.sleep(2)
        raise TimeoutError(f"DAGs not parsed within {timeout}s; dag-processor log:\n{self.tail('dag-processor')}")

    def start_run(self, dag_id: str, conf: dict) -> str:
        """Trigger a run now and return its run id (do not wait)."""
        self.wait_idle()
        run_id = f"bench__{uuid.uuid4().hex[:12]}"
        self.cli("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf))
        return run_id

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 7200, on_poll=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self._query("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id))
            if rows and rows[0] and rows[0][0] in ("success", "failed"):
                return self.run_figures(dag_id, run_id)
            if on_poll:
                on_poll()
            time.sleep(1)
        raise TimeoutError(
            f"{dag_id} run {run_id} not finished after {timeout}s; scheduler log:\n{self.tail('scheduler')}"
        )

    def run_figures(self, dag_id: str, run_id: str) -> dict:
        ((state, start, end),) = self._query(
            "SELECT state, start_date, end_date FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id)
        )
        tis = self._query(
            "SELECT task_id, state, count(*), sum(coalesce(duration, 0)) FROM task_instance "
            "WHERE dag_id = %s AND run_id = %s GROUP BY 1, 2",
            (dag_id, run_id),
        )
        # where the run's time went: each task instance's queued/start/end, seconds after the run started
        rows = self._query(
            "SELECT task_id, map_index, queued_dttm, start_date, end_date FROM task_instance "
            "WHERE dag_id = %s AND run_id = %s ORDER BY start_date NULLS LAST, map_index",
            (dag_id, run_id),
        )

        def rel(t):
            return round((t - start).total_seconds(), 2) if t is not None else None

        return {
            "state": state,
            "run_seconds": (end - start).total_seconds(),
            "start": start,
            "end": end,
            "tasks": {f"{t}:{s}": n for t, s, n, _ in tis},
            "chunks": sum(n for t, s, n, _ in tis if t == "load_chunk"),
            "retried": self._query(
                "SELECT count(*) FROM task_instance WHERE dag_id = %s AND run_id = %s AND try_number > 1",
                (dag_id, run_id),
            )[0][0],
            "timeline": [[t, i, rel(q), rel(b), rel(e)] for t, i, q, b, e in rows],
        }

    def states_now(self, dag_id: str, run_id: str) -> dict[str, int]:
        """How many of the run's task instances are running, deferred and up for retry right now."""
        rows = self._query(
            "SELECT state, count(*) FROM task_instance WHERE dag_id = %s AND run_id = %s "
            "AND state IN ('running', 'deferred', 'up_for_retry') GROUP BY 1",
            (dag_id, run_id),
        )
        return {s: n for s, n in rows if isinstance(s, str)}

    def run_started(self, dag_id: str, run_id: str) -> float | None:
        """The DAG run's start (epoch seconds), None while it has not started."""
        rows = self._query("SELECT start_date FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id))
        start = rows[0][0] if rows else None
        return start.timestamp() if hasattr(start, "timestamp") else None

    def task_logs(self, dag_id: str, run_id: str) -> list[Path]:
        """The local log files of every task instance of one run (every map index and attempt)."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        return sorted(folder.glob("**/attempt=*.log"))

    def deferred_now(self, dag_id: str, run_id: str) -> int:
        return self._query(
            "SELECT count(*) FROM task_instance WHERE dag_id = %s AND run_id = %s AND state = 'deferred'",
            (dag_id, run_id),
        )[0][0]


def run_backfill(
    admin_url: str, src_url: str, dst_url: str, spec: dict, conf: dict, log=print, *, warm_up: bool = True
) -> dict:
    """Start Airflow, run the spec's DAG once over ``conf``'s range, return the run's figures.

    ``warm_up``: first one untimed run over an empty range (2031-01-01, one day). A freshly started Airflow
    3 spends ~8-10 s on its first task instance (the API server's first execution-API requests), a cost
    paid once per Airflow start, not per backfill; a user's Airflow has run tasks before. Its wall time
    is returned as ``warm_up_seconds``."""
    with BackfillSandbox(admin_url, src_url, dst_url, [spec], log=log) as sb:
        sb.start_services()
        dag_id = sb.dag_ids[0]
        warm = None
        if warm_up:
            w = sb.start_run(dag_id, {"start": "2031-01-01", "end": "2031-01-02"})
            warm = sb.wait_run(dag_id, w)
            log(f"(9) warm-up run over an empty day: {warm['state']} in {warm['run_seconds']:.1f} s (not timed)")
        run_id = sb.start_run(dag_id, conf)
        figures = sb.wait_run(dag_id, run_id)
        figures["warm_up_seconds"] = warm["run_seconds"] if warm else None
        return figures
