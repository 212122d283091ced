"""A real Airflow cluster for end-to-end tests.

``AirflowCluster`` starts the Airflow components of the venv that runs the tests (3.x: api-server, scheduler,
dag-processor, triggerer; 2.11: webserver, scheduler, triggerer) in a private temporary AIRFLOW_HOME, on a
throwaway PostgreSQL metadata database with a random name, and stops every process it started (process
groups and all their descendants, SIGTERM then SIGKILL) and drops the database, even when a test fails.

It drives the cluster the way a user does: the ``airflow`` CLI and the REST API (3.x ``/api/v2`` with a
SimpleAuthManager token; 2.11 ``/api/v1`` with basic auth). Every wait is bounded and, on timeout or on a
component dying, raises ``ClusterError`` with the task states and the tails of the relevant logs.

The executor is pluggable (``LocalExecutorSetup`` by default; ``CeleryExecutorSetup`` adds Redis as broker
and N ``airflow celery worker`` processes, started and stopped with the rest).

Typical use, one cluster per test module::

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory):
        with AirflowCluster(dags_folder=DAGS, connections={"src": url}, pools={"p": 2}) as c:
            c.wait_for_dag("my_dag")
            c.unpause("my_dag")
            yield c
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import requests
from psycopg2 import sql

ADMIN_URL = os.environ.get("BACKFILL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REPO_ROOT = Path(__file__).resolve().parents[2]


def code_path(folder: Path) -> Path:
    """A folder importing the tree's code (symlinks to its top-level entries) without its packaging metadata.

    Putting the checkout itself on a cluster's PYTHONPATH also puts the ``*.egg-info`` that ``pip install -e``
    leaves there on it: a second distribution of the provider next to the installed one, so the provider's
    plugin is found twice. Airflow 3's task-side plugin loader stops at a repeated plugin name
    (``airflow.sdk.plugins_manager._get_plugins``: ``return``, not ``continue``), silently dropping every
    plugin after it, OpenLineage's listener included: task processes then emit no lineage at all.
    """
    if not folder.exists():
        folder.mkdir(parents=True)
        for entry in REPO_ROOT.iterdir():
            if not entry.name.endswith((".egg-info", ".dist-info")) and not entry.name.startswith("."):
                (folder / entry.name).symlink_to(entry)
    return folder


TERMINAL_RUN_STATES = frozenset({"success", "failed"})
API_USER = ("admin", "admin")  # 2.11 basic auth user created by the harness


class ClusterError(AssertionError):
    """The cluster did not do what the test waited for; the message carries the evidence."""


@dataclass(frozen=True)
class TaskInstance:
    task_id: str
    map_index: int
    rendered_map_index: str | None
    state: str | None
    try_number: int
    start_date: datetime | None
    end_date: datetime | None
    pool: str | None
    hostname: str | None = None  # the worker that ran it ('' or None until it started)

    @property
    def label(self) -> str:
        """What the grid shows: the rendered map index, else the number."""
        return self.rendered_map_index or str(self.map_index)


def airflow_major() -> int:
    """Major version of the Airflow installed next to this Python, without importing airflow."""
    return int(importlib.metadata.version("apache-airflow").split(".")[0])


def _parse_dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"<{path} missing>"
    return "\n".join(text[-lines:])


@contextlib.contextmanager
def _pg_admin_cursor():
    conn = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def _db_url(dbname: str, driver: str = "postgresql") -> str:
    from urllib.parse import urlsplit, urlunsplit

    # scheme and path only: a socket server's ?host=/dir query stays with it
    return urlunsplit(urlsplit(ADMIN_URL)._replace(scheme=driver, path="/" + dbname))


# --------------------------------------------------------------------------------------------- executors
@contextlib.contextmanager
def redis_server(host: str = "127.0.0.1"):
    """Yield ``(url, None)`` for a Redis to use, or ``(None, why not)`` (for ``pytest.skip``).

    A private, non-persistent redis-server on a free port, stopped (and waited for) on exit: the harness stops
    what it starts. ``E2E_REDIS_URL`` uses an existing Redis instead, left running.
    """
    try:
        import redis
    except ImportError:
        yield None, f"the redis client is not installed in {sys.prefix} (pip install apache-airflow-providers-celery)"
        return

    def answers(url: str) -> bool:
        try:
            with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    if os.environ.get("E2E_REDIS_URL"):
        url = os.environ["E2E_REDIS_URL"].rstrip("/")
        yield (url, None) if answers(url) else (None, f"E2E_REDIS_URL={url} does not answer")
        return
    server = shutil.which("redis-server")
    if server is None:
        yield None, "redis-server is not installed (or set E2E_REDIS_URL to an existing Redis)"
        return
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    url = f"redis://{host}:{port}"
    cmd = [server, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                yield (
                    None,
                    f"`{' '.join(cmd)}` did not answer (exit {proc.poll()}): {(proc.stderr.read() if proc.poll() is not None else '')[-500:]}",
                )
                return
            time.sleep(0.05)
        yield url, None
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def celery_missing() -> list[str]:
    """What CeleryExecutorSetup needs and this venv lacks (checked without importing airflow)."""
    missing = []
    try:
        importlib.metadata.version("apache-airflow-providers-celery")
    except importlib.metadata.PackageNotFoundError:
        missing.append("apache-airflow-providers-celery")
    return missing + [m for m in ("celery", "redis") if importlib.util.find_spec(m) is None]


class LocalExecutorSetup:
    """Tasks run as children of the scheduler; nothing extra to start, wait for or clean up."""

    name = "LocalExecutor"

    def env(self, cluster: AirflowCluster) -> dict[str, str]:
        return {}

    def processes(self, cluster: AirflowCluster) -> list[tuple[str, list[str], dict[str, str]]]:
        return []

    def prepare(self, cluster: AirflowCluster) -> None:
        pass

    def wait_ready(self, cluster: AirflowCluster) -> None:
        pass

    def cleanup(self, cluster: AirflowCluster) -> None:
        pass


class CeleryExecutorSetup:
    """CeleryExecutor: Redis as broker, results in the cluster's metadata DB, N ``airflow celery worker``s.

    Needs apache-airflow-providers-celery, celery and redis in the venv. Isolation from other clusters on the
    same Redis: each cluster claims an empty Redis database (1..15) with an atomic marker key (SET NX) and uses
    its own queue name, so parallel runs can neither steal nor flush each other's tasks; at stop the database
    is flushed, but only if the marker is still ours. Each worker gets its own Celery hostname, pid file and,
    through ``[core] hostname_callable``, its own task instance ``hostname`` (``w<i>-<cluster tag>``), so a test
    can tell which worker ran what on one machine.
    """

    name = "CeleryExecutor"
    CLAIM_KEY = "airflow-backfill-e2e:owner"

    def __init__(self, workers: int = 2, concurrency: int = 2, redis_url: str = "redis://127.0.0.1:6379"):
        missing = celery_missing()
        if missing:
            raise ClusterError(
                f"CeleryExecutorSetup needs {', '.join(missing)} in {sys.prefix}: install the pins of "
                "requirements/airflow-3.3.txt (apache-airflow-providers-celery, celery[redis]) or use LocalExecutorSetup"
            )
        self.workers, self.concurrency = workers, concurrency
        self.redis_url = redis_url.rstrip("/")
        self.db: int | None = None
        self.owner = ""

    @property
    def broker(self) -> str:
        if self.db is None:
            raise ClusterError("CeleryExecutorSetup.broker used before prepare() claimed a Redis database")
        return f"{self.redis_url}/{self.db}"

    def hostnames(self, cluster: AirflowCluster) -> list[str]:
        return [f"w{i}-{cluster.tag}" for i in range(self.workers)]

    def queue(self, cluster: AirflowCluster) -> str:
        return f"e2e-{cluster.tag}"

    def prepare(self, cluster: AirflowCluster) -> None:
        """Claim an empty Redis database for this cluster (random order, so parallel runs spread out)."""
        import redis

        self.owner = cluster.tag
        for db in random.sample(range(1, 16), 15):
            client = redis.Redis.from_url(f"{self.redis_url}/{db}", socket_timeout=5)
            try:
                # Empty and unclaimed; SET NX makes the claim atomic against a parallel run choosing the same db.
                if client.dbsize() == 0 and client.set(self.CLAIM_KEY, self.owner, nx=True, ex=24 * 3600):
                    self.db = db
                    return
            finally:
                client.close()
        raise ClusterError(f"no empty Redis database among 1..15 at {self.redis_url}; flush stale ones (FLUSHDB)")

    def env(self, cluster: AirflowCluster) -> dict[str, str]:
        return {
            "AIRFLOW__CELERY__BROKER_URL": self.broker,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + _db_url(cluster.meta_db),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.concurrency),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue(cluster),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.e2e.worker_hostname.get_hostname",
        }

    def processes(self, cluster: AirflowCluster) -> list[tuple[str, list[str], dict[str, str]]]:
        # Several workers share one host and one AIRFLOW_HOME: each needs its own name and pid file, and
        # none may start serve-logs (they would all bind the same port; the api-server reads local files).
        return [
            (
                f"celery-worker-{i}",
                [
                    "celery",
                    "worker",
                    "--celery-hostname",
                    f"{host}@%h",
                    "--queues",
                    self.queue(cluster),
                    "--concurrency",
                    str(self.concurrency),
                    "--skip-serve-logs",
                    "--pid",
                    str(cluster.home / f"celery-worker-{i}.pid"),
                ],
                {"E2E_WORKER_HOSTNAME": host},
            )  # fmt: skip
            for i, host in enumerate(self.hostnames(cluster))
        ]

    def wait_ready(self, cluster: AirflowCluster, timeout: float = 120) -> None:
        """Until every worker answers a Celery ping: a task queued earlier would go to the first one up."""
        from celery import Celery

        app = Celery(broker=self.broker)
        wanted = set(self.hostnames(cluster))
        try:

            def all_answer():
                replies = app.control.ping(timeout=2) or []
                return wanted <= {name.split("@", 1)[0] for reply in replies for name in reply}

            cluster.wait_until(f"celery workers {sorted(wanted)} to answer a ping", all_answer, timeout, interval=1)
        finally:
            app.close()

    def cleanup(self, cluster: AirflowCluster) -> None:
        """Flush the claimed Redis database (the processes are already stopped), only if the claim is still ours."""
        if self.db is None:
            return
        import redis

        client = redis.Redis.from_url(self.broker, socket_timeout=5)
        try:
            if client.get(self.CLAIM_KEY) == self.owner.encode():
                client.flushdb()
        finally:
            client.close()
        self.db = None


# --------------------------------------------------------------------------------------------- cluster
class AirflowCluster:
    """Start with ``with AirflowCluster(...) as c`` (or ``start()``/``stop()``); see the module docstring."""

    def __init__(
        self,
        dags_folder: str | Path,
        *,
        executor: LocalExecutorSetup | CeleryExecutorSetup | None = None,
        connections: Mapping[str, str] | None = None,
        pools: Mapping[str, int] | None = None,
        pools_include_deferred: bool = True,
        env: Mapping[str, str] | None = None,
        parallelism: int = 8,
        triggerer: bool = True,
        airflow_bin: str | Path | None = None,
        start_timeout: float = 240,
    ):
        self.dags_folder = Path(dags_folder).resolve()
        self.executor = executor or LocalExecutorSetup()
        self.connections = dict(connections or {})
        self.pools = dict(pools or {})
        # As the docs tell users: a deferred chunk (waiting for a busy source) keeps its pool slot.
        self.pools_include_deferred = pools_include_deferred
        self.extra_env = dict(env or {})
        self.parallelism = parallelism
        self.with_triggerer = triggerer
        self.airflow_bin = str(airflow_bin or Path(sys.executable).with_name("airflow"))
        self.start_timeout = start_timeout
        self.version = importlib.metadata.version("apache-airflow")
        self.v3 = int(self.version.split(".")[0]) >= 3
        self.tag = uuid.uuid4().hex[:8]
        self.meta_db = f"af_meta_{self.tag}"
        self.home: Path | None = None
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_prefix = "/api/v2" if self.v3 else "/api/v1"
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self.backfill_deadlocks = 0  # 2.11 only; see backfill()
        self._db_created = False
        self._http = requests.Session()
        self.env: dict[str, str] = {}

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> AirflowCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        atexit.register(self.stop)  # last resort if the caller never reaches stop()
        self.home = Path(tempfile.mkdtemp(prefix=f"af-e2e-{self.tag}-"))
        (self.home / "proc-logs").mkdir()
        with _pg_admin_cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.meta_db)))
        self._db_created = True
        self.executor.prepare(self)
        self.env = self._build_env()
        self.cli("db", "migrate", timeout=300)
        self.timings["db_migrate"] = time.monotonic() - t0
        if not self.v3:
            self.cli(
                "users", "create", "--role", "Admin", "--username", API_USER[0], "--password", API_USER[1],
                "--email", "admin@example.invalid", "--firstname", "e2e", "--lastname", "admin",
            )  # fmt: skip
        if self.pools:
            pools_file = self.home / "pools.json"
            pools_file.write_text(
                json.dumps(
                    {
                        n: {"slots": s, "description": "e2e", "include_deferred": self.pools_include_deferred}
                        for n, s in self.pools.items()
                    }
                )
            )
            self.cli("pools", "import", str(pools_file))
        for name, args, extra_env in self._components():
            self._spawn(name, args, extra_env)
        self._wait_healthy()
        self.executor.wait_ready(self)
        self._authenticate()
        self.timings["start_total"] = time.monotonic() - t0

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process (their groups and all descendants), then drop the metadata DB. Idempotent.

        SIGTERM first; whatever is left after ``grace`` seconds gets SIGKILL. A scheduler with running tasks
        would wait for them to finish, and a test teardown has no reason to wait for that.
        """
        atexit.unregister(self.stop)
        # Task processes put themselves in their own process group, so signalling the components' groups is
        # not enough: collect the whole tree first, plus anything else started in our AIRFLOW_HOME (reparented
        # ones, tasks of a CLI backfill that timed out).
        victims = {p.pid: p for p in self._processes()}
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for p in victims.values():
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        alive += [p for p in self._processes() if p.pid not in victims]
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        self._http.close()
        try:
            self.executor.cleanup(self)
        finally:
            if self._db_created:
                with _pg_admin_cursor() as cur:
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                        (self.meta_db,),
                    )
                    cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.meta_db)))
                self._db_created = False
        if self.home and not os.environ.get("E2E_KEEP_HOME"):
            shutil.rmtree(self.home, ignore_errors=True)

    # ---------------------------------------------------------------- configuration
    def _build_env(self) -> dict[str, str]:
        # Start from a clean slate: a developer's own AIRFLOW__* settings must not leak into the cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        secret = base64.urlsafe_b64encode(os.urandom(32)).decode()
        pythonpath = [str(code_path(self.home / "code")), *filter(None, [os.environ.get("PYTHONPATH")])]
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "PYTHONPATH": os.pathsep.join(pythonpath),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": self.executor.name,
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__FERNET_KEY": secret,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _db_url(self.meta_db, "postgresql+psycopg2"),
                # max_connections is shared with other test runs on this server: keep each pool small.
                "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "2",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "8",
                # Fixed default ports (8793/8794) would collide between clusters running side by side.
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            }
        )
        if self.v3:
            env.update(
                {
                    "AIRFLOW__API__HOST": "127.0.0.1",
                    "AIRFLOW__API__PORT": str(self.port),
                    "AIRFLOW__API__BASE_URL": self.base_url,
                    "AIRFLOW__API__SECRET_KEY": secret,
                    "AIRFLOW__API_AUTH__JWT_SECRET": secret,
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                    # Every request is an admin (the middleware adds a token); GET /auth/token hands one out.
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
                    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
                    "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "2",
                }
            )
        else:
            env.update(
                {
                    "AIRFLOW__WEBSERVER__WEB_SERVER_HOST": "127.0.0.1",
                    "AIRFLOW__WEBSERVER__WEB_SERVER_PORT": str(self.port),
                    "AIRFLOW__WEBSERVER__BASE_URL": self.base_url,
                    "AIRFLOW__WEBSERVER__SECRET_KEY": secret,
                    "AIRFLOW__WEBSERVER__WORKERS": "1",
                    "AIRFLOW__API__AUTH_BACKENDS": "airflow.api.auth.backend.basic_auth",
                    "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "2",
                    "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
                }
            )
        env.update(self.executor.env(self))
        env.update({f"AIRFLOW_CONN_{cid.upper()}": uri for cid, uri in self.connections.items()})
        env.update(self.extra_env)
        return env

    def _components(self) -> list[tuple[str, list[str]]]:
        if self.v3:
            parts = [("api-server", ["api-server"]), ("scheduler", ["scheduler"]), ("dag-processor", ["dag-processor"])]
        else:
            parts = [("webserver", ["webserver"]), ("scheduler", ["scheduler"])]
        if self.with_triggerer:
            parts.append(("triggerer", ["triggerer"]))
        return [(n, a, {}) for n, a in parts] + self.executor.processes(self)

    # ---------------------------------------------------------------- processes
    def _spawn(self, name: str, args: Sequence[str], extra_env: Mapping[str, str] | None = None) -> None:
        log = open(self.home / "proc-logs" / f"{name}.log", "ab")  # noqa: SIM115 (kept open by the child)
        # Own session => own process group, so stop() can signal the component and its helpers together.
        self.procs[name] = subprocess.Popen(
            [self.airflow_bin, *args], env={**self.env, **(extra_env or {})}, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()

    def cli(
        self, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run ``airflow <args>`` against this cluster; on timeout its whole process group is killed."""
        proc = subprocess.Popen(
            [self.airflow_bin, *args], env={**self.env, **(env or {})}, cwd=self.home, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise ClusterError(
                f"`airflow {' '.join(args)}` did not finish within {timeout:.0f}s\n--- stdout\n{out[-3000:]}\n"
                f"--- stderr\n{err[-3000:]}\n{self.diagnostics()}"
            ) from None
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise ClusterError(
                f"`airflow {' '.join(args)}` exited {proc.returncode}\n--- stdout\n{out[-3000:]}\n"
                f"--- stderr\n{err[-3000:]}"
            )
        return result

    def _processes(self) -> list[psutil.Process]:
        """The components, all their descendants, and any other process started in this AIRFLOW_HOME."""
        found: dict[int, psutil.Process] = {}
        for proc in self.procs.values():
            try:
                root = psutil.Process(proc.pid)
                found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        if self.home:
            for p in psutil.process_iter():
                if p.pid != os.getpid() and p.pid not in found and self._started_here(p):
                    found[p.pid] = p
        return list(found.values())

    def _started_here(self, p: psutil.Process) -> bool:
        # Every process is started with cwd=home. The working directory is the reliable mark: processes that
        # retitle themselves (api_server, serve-logs, executor workers) garble /proc/<pid>/environ.
        try:
            if Path(p.cwd()).is_relative_to(self.home):
                return True
        except psutil.Error:
            pass
        try:
            return p.environ().get("AIRFLOW_HOME") == str(self.home)
        except psutil.Error:
            return False

    def pids(self) -> set[int]:
        """Every live process of the cluster (task processes included)."""
        return {p.pid for p in self._processes()}

    def log_path(self, name: str) -> Path:
        return self.home / "proc-logs" / f"{name}.log"

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ClusterError(
                    f"Airflow {name} exited with code {proc.returncode}\n--- {name} log tail\n{_tail(self.log_path(name), 60)}"
                )

    def diagnostics(self, lines: int = 25) -> str:
        return "\n".join(f"--- {n} log tail\n{_tail(self.log_path(n), lines)}" for n in self.procs)

    def wait_until(self, what: str, predicate: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
        """Poll ``predicate`` until it returns something truthy; fail fast if a component died."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            self._check_alive()
            try:
                result = predicate()
                if result:
                    return result
            except (requests.RequestException, ClusterError) as err:
                last_error = err
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out after {timeout:.0f}s waiting for {what}; last error: {last_error!r}\n{self.diagnostics()}"
                )
            time.sleep(interval)

    def _wait_healthy(self) -> None:
        wanted = ["metadatabase", "scheduler"] + (["dag_processor"] if self.v3 else [])
        wanted += ["triggerer"] if self.with_triggerer else []

        def healthy():
            path = "/api/v2/monitor/health" if self.v3 else "/health"
            body = self._http.get(self.base_url + path, timeout=5).json()
            return all((body.get(k) or {}).get("status") == "healthy" for k in wanted)

        self.wait_until("all components healthy", healthy, timeout=self.start_timeout, interval=1)

    def _authenticate(self) -> None:
        if self.v3:
            resp = self._http.get(f"{self.base_url}/auth/token", timeout=10)
            resp.raise_for_status()
            self._http.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"
        else:
            self._http.auth = API_USER

    # ---------------------------------------------------------------- REST
    def api(self, method: str, path: str, *, expect: Iterable[int] = (200, 201), **kwargs) -> Any:
        """Call the public REST API (``path`` relative to /api/v2 or /api/v1); return the decoded JSON."""
        resp = self._http.request(method, self.base_url + self.api_prefix + path, timeout=30, **kwargs)
        if resp.status_code not in tuple(expect):
            raise ClusterError(f"{method} {self.api_prefix}{path} -> HTTP {resp.status_code}: {resp.text[:2000]}")
        return resp.json() if resp.content else None

    def _paged(self, path: str, key: str, params: Mapping[str, Any] | None = None) -> list[dict]:
        items: list[dict] = []
        while True:
            page = self.api("GET", path, params={**(params or {}), "limit": 100, "offset": len(items)})
            items += page[key]
            if not page[key] or len(items) >= page["total_entries"]:
                return items

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        """Wait until the DAG is parsed and serialized; fail at once with the import error if it has one."""

        def present():
            errors = self.api("GET", "/importErrors")["import_errors"]
            if errors:
                raise ClusterError(
                    "DAG import errors:\n" + "\n".join(e["filename"] + ":\n" + e["stack_trace"] for e in errors)
                )
            return self.api("GET", f"/dags/{dag_id}", expect=(200, 404)).get("dag_id") == dag_id

        deadline = time.monotonic() + timeout
        while not present():
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterError(f"DAG {dag_id!r} did not appear within {timeout:.0f}s\n{self.diagnostics()}")
            time.sleep(1)

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False}, params={"update_mask": "is_paused"})

    def set_pool(self, name: str, slots: int, *, include_deferred: bool = True) -> None:
        self.cli("pools", "set", name, str(slots), "e2e", *(["--include-deferred"] if include_deferred else []))

    def trigger(
        self, dag_id: str, conf: Mapping[str, Any] | None = None, *, via: str = "rest", run_id: str | None = None
    ) -> str:
        """Trigger a manual run with ``conf`` through the REST API or the CLI; return its run id."""
        run_id = run_id or f"e2e__{uuid.uuid4().hex[:12]}"
        if via == "cli":
            self.cli("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf or {}))
        elif via == "rest":
            body: dict[str, Any] = {"dag_run_id": run_id, "conf": dict(conf or {})}
            if self.v3:
                body["logical_date"] = None  # required key on 3.x; None = a manual run without a logical date
            self.api("POST", f"/dags/{dag_id}/dagRuns", json=body)
        else:
            raise ValueError(f"via={via!r}: use 'rest' or 'cli'")
        return run_id

    def trigger_expect_rejected(self, dag_id: str, conf: Mapping[str, Any]) -> str:
        """POST a run that Airflow must refuse (e.g. bad params); return the error text."""
        body: dict[str, Any] = {"conf": dict(conf)}
        if self.v3:
            body["logical_date"] = None
        resp = self._http.post(f"{self.base_url}{self.api_prefix}/dags/{dag_id}/dagRuns", json=body, timeout=30)
        if resp.status_code < 400:
            raise ClusterError(f"Airflow accepted conf {conf!r} for {dag_id}; expected a 4xx refusal")
        return resp.text

    def dag_runs(self, dag_id: str, run_type: str | None = None) -> list[dict]:
        runs = self._paged(f"/dags/{dag_id}/dagRuns", "dag_runs")
        return [r for r in runs if run_type is None or r["run_type"] == run_type]

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def backfill(
        self,
        dag_id: str,
        start: date | str,
        end: date | str,
        *,
        max_active_runs: int | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = 600,
        deadlock_retries: int = 3,
    ) -> list[str]:
        """Backfill logical dates ``start``..``end`` (both inclusive) the way users do; return the run ids.

        3.x: ``airflow backfill create`` only creates the runs (the scheduler runs them; the DAG must be
        unpaused); wait for them with ``wait_for_runs``. 2.11: ``airflow dags backfill`` runs them in the
        foreground, with ``[scheduler] schedule_after_task_execution`` off because the mini scheduler
        deadlocks BackfillJob on mapped tasks. Even so, 2.11's BackfillJob can still stop with "BackfillJob is
        deadlocked": when an upstream task's success is read from the DB before the executor reports it, the
        executor event is dropped ("state success not in running") and the mapped task is never expanded.
        Re-running the same command resumes the runs (finished task instances are not re-run), so that is
        what this does, at most ``deadlock_retries`` times; ``self.backfill_deadlocks`` counts them.
        """
        before = {r["dag_run_id"] for r in self.dag_runs(dag_id, "backfill")}
        if self.v3:
            args = ["backfill", "create", "--dag-id", dag_id, "--from-date", str(start), "--to-date", str(end)]
            if max_active_runs:
                args += ["--max-active-runs", str(max_active_runs)]
            self.cli(*args, *extra_args, timeout=120)
        else:
            args = ["dags", "backfill", "--start-date", str(start), "--end-date", str(end), *extra_args, dag_id]
            for attempt in range(deadlock_retries + 1):
                result = self.cli(
                    *args,
                    timeout=timeout,
                    check=False,
                    env={"AIRFLOW__SCHEDULER__SCHEDULE_AFTER_TASK_EXECUTION": "False"},
                )
                if result.returncode == 0:
                    break
                if "BackfillJob is deadlocked" not in result.stdout + result.stderr or attempt == deadlock_retries:
                    raise ClusterError(
                        f"`airflow {' '.join(args)}` exited {result.returncode} (attempt {attempt + 1})\n"
                        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
                    )
                self.backfill_deadlocks += 1
        runs = [r for r in self.dag_runs(dag_id, "backfill") if r["dag_run_id"] not in before]
        return [r["dag_run_id"] for r in sorted(runs, key=lambda r: r["logical_date"])]

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout: float = 240, states: Iterable[str] = TERMINAL_RUN_STATES
    ) -> str:
        """Wait until the run reaches one of ``states``; return that state."""
        wanted = frozenset(states)

        def reached():
            state = self.dag_run(dag_id, run_id)["state"]
            return state if state in wanted else None

        try:
            return self.wait_until(f"run {dag_id}/{run_id} to reach {sorted(wanted)}", reached, timeout, interval=1)
        except ClusterError as err:
            raise ClusterError(f"{err}\n{self.describe_run(dag_id, run_id)}") from None

    def wait_for_runs(self, dag_id: str, run_ids: Iterable[str], timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        return {r: self.wait_for_run(dag_id, r, timeout=max(1.0, deadline - time.monotonic())) for r in run_ids}

    def task_instances(self, dag_id: str, run_id: str, task_id: str | None = None) -> list[TaskInstance]:
        """Every task instance of the run (each map index separately), optionally only one task's."""
        raw = self._paged(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", "task_instances")
        tis = [
            TaskInstance(
                task_id=t["task_id"],
                map_index=t["map_index"],
                rendered_map_index=t.get("rendered_map_index"),
                state=t["state"],
                try_number=t["try_number"],
                start_date=_parse_dt(t["start_date"]),
                end_date=_parse_dt(t["end_date"]),
                pool=t.get("pool"),
                hostname=t.get("hostname"),
            )  # fmt: skip
            for t in raw
        ]
        return sorted(
            (t for t in tis if task_id is None or t.task_id == task_id), key=lambda t: (t.task_id, t.map_index)
        )

    def clear_failed(
        self, dag_id: str, run_id: str, task_id: str, map_index: int | None = None, *, include_downstream: bool = True
    ) -> list[tuple[str, int | None]]:
        """Clear the failed task instance(s) of one task in one run (and what depends on them).

        Returns ``(task_id, map_index)`` of each cleared instance (map_index is None on 2.11, whose response
        does not carry it).

        3.x targets exactly ``(task_id, map_index)``. 2.11's REST API takes task ids only, so there every failed
        map index of ``task_id`` in the run is cleared (``only_failed`` leaves the successful ones alone).
        ``dry_run`` defaults to true server-side, which silently clears nothing: it is always sent as false.
        """
        target: Any = [task_id, map_index] if (self.v3 and map_index is not None) else task_id
        body = {
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": [target],
            "only_failed": True,
            "reset_dag_runs": True,
            "include_downstream": include_downstream,
        }
        cleared = self.api("POST", f"/dags/{dag_id}/clearTaskInstances", json=body)["task_instances"]
        if not cleared:
            raise ClusterError(
                f"clearing {task_id}[{map_index}] of {dag_id}/{run_id} cleared nothing\n{self.describe_run(dag_id, run_id)}"
            )
        return sorted((c["task_id"], c.get("map_index")) for c in cleared)

    # ---------------------------------------------------------------- evidence
    def task_log(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
        """Concatenated local log files of every attempt of one task instance ('' if none)."""
        parts = [f"map_index={map_index}"] if map_index >= 0 else []
        folder = Path(self.home, "logs", f"dag_id={dag_id}", f"run_id={run_id}", f"task_id={task_id}", *parts)
        return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob("attempt=*.log")))

    def describe_run(self, dag_id: str, run_id: str, log_lines: int = 30) -> str:
        """Task instance states, plus log tails of the failed ones: what a human would look at first."""
        try:
            tis = self.task_instances(dag_id, run_id)
        except (ClusterError, requests.RequestException) as err:
            return f"(could not list task instances: {err})"
        lines = [f"task instances of {dag_id}/{run_id}:"]
        lines += [f"  {t.task_id}[{t.label}] {t.state} try={t.try_number}" for t in tis]
        for t in tis:
            if t.state in ("failed", "upstream_failed", "up_for_retry"):
                log = self.task_log(dag_id, run_id, t.task_id, t.map_index).splitlines()[-log_lines:]
                lines += [f"--- log of {t.task_id}[{t.label}]", *log]
        return "\n".join(lines)


def max_overlap(intervals: Iterable[tuple[datetime, datetime]]) -> int:
    """Largest number of half-open [start, end) intervals that overlap at one instant."""
    intervals = list(intervals)
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    current = peak = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak
