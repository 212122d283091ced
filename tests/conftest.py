"""Shared fixtures: throwaway source/destination databases on a real PostgreSQL server.

Set BACKFILL_TEST_PG_URL to point at another server (default: postgresql://postgres@127.0.0.1:5432/postgres).
Databases are created per test session with a random suffix, so parallel runs do not collide.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

# Airflow reads its config at import time: give every test session a private, throwaway AIRFLOW_HOME
# (unless the caller chose one) before anything imports airflow.
REPO = Path(__file__).resolve().parents[1]
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="bf_airflow_home_")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")

import psycopg2
import pytest
from psycopg2 import sql

ADMIN_URL = os.environ.get("BACKFILL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin():
    try:
        conn = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    except psycopg2.OperationalError as err:  # say exactly what to do
        pytest.exit(
            f"PostgreSQL is not reachable at {ADMIN_URL}: {err}\n"
            "Run the tests through `make test` (or `scripts/pg.sh run pytest ...`), which starts a private server, "
            "or set BACKFILL_TEST_PG_URL to a running one.",
            returncode=3,
        )
    conn.autocommit = True
    return conn


def db_url(dbname: str, admin_url: str | None = None) -> str:
    """The server's URL with another database: only the path changes, so a Unix-socket server given as
    ``postgresql://postgres@/postgres?host=/run/dir`` (or a percent-encoded host) keeps its query."""
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(admin_url or ADMIN_URL)._replace(path="/" + dbname))


class ThrowawayDatabases:
    """Creates databases on demand and drops them all at the end of the session."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:8]
        self.created: list[str] = []

    def create(self, label: str) -> str:
        name = f"bf_{label}_{self.tag}_{len(self.created)}"
        admin = _admin()
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        admin.close()
        self.created.append(name)
        return db_url(name)

    def drop_all(self):
        if os.environ.get("BACKFILL_TEST_PG_THROWAWAY") == "1":
            return  # a private server started for this run (scripts/pg.sh) is deleted whole when it ends
        admin = _admin()
        with admin.cursor() as cur:
            for name in self.created:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.close()


@pytest.fixture(scope="session")
def databases():
    dbs = ThrowawayDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture()
def src_url(databases) -> str:
    return databases.create("src")


@pytest.fixture()
def dst_url(databases) -> str:
    return databases.create("dst")


@pytest.fixture()
def pg():
    """Open autocommit connections by URL; all closed at test end."""
    opened = []

    def _open(url: str):
        conn = psycopg2.connect(url)
        conn.autocommit = True
        opened.append(conn)
        return conn

    yield _open
    for conn in opened:
        conn.close()


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata DB (SQLite in the private AIRFLOW_HOME), for dag.test() runs."""
    import subprocess
    import sys

    airflow_bin = Path(sys.executable).with_name("airflow")
    proc = subprocess.run([str(airflow_bin), "db", "migrate"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    # the specs' default pool: on Airflow 2.11 the plan task refuses a missing pool
    subprocess.run(
        [str(airflow_bin), "pools", "set", "backfill_source", "4", "test"], capture_output=True, check=True, timeout=300
    )
    return os.environ["AIRFLOW_HOME"]


def fetch_all(url: str, query, params=None) -> list[tuple]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


def plan_on(spec, src_url: str, dst_url: str, start, end, **kw):
    """``build_plan`` with its own source and destination sessions, closed after."""
    from airflow_backfill_provider.plan.planning import build_plan

    src, dst = psycopg2.connect(src_url), psycopg2.connect(dst_url)
    try:
        return build_plan(spec, start, end, src_conn=src, dst_conn=dst, **kw)
    finally:
        src.close()
        dst.close()


def table_digest(url: str, table: str = "orders", key: str = "id") -> tuple[int, str]:
    """(row count, md5 of all rows in key order): equal digests mean equal tables."""
    q = sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t.{k}), '')) FROM {t} t").format(
        t=sql.Identifier(table), k=sql.Identifier(key)
    )
    return fetch_all(url, q)[0]


# `make check` leaves out tests marked "slow": those that run Airflow itself (dag.test() through the airflow_db
# fixture, the airflow CLI in a subprocess) or many rounds. `make test` runs them.
_SLOW_MODULES = {"test_bench_smoke", "test_compose", "test_provider", "test_race"}

#: fixtures that reach a PostgreSQL server: a test that uses one, directly or through a fixture built on it (the
#: fixture closure), is marked `db`. `databases` is under src_url, dst_url and every module's database fixture;
#: the others connect by URL or start servers of their own.
DB_FIXTURES = {"databases", "pg", "private_source", "private_pg", "primary_and_standby"}
#: modules whose tests connect without one of those fixtures (every test of the module is marked `db`):
#: the benchmark's smoke run reaches BACKFILL_TEST_PG_URL from a subprocess
DB_MODULES = {"test_bench_smoke"}


#: a test module that imports Airflow or the provider's Airflow surface (operators, triggers, DAG factory, UI, the
#: version_compat module), eagerly or inside a test, drives Airflow: marked `airflow` (below)
_DRIVES_AIRFLOW = re.compile(
    r"^\s*(?:from|import)\s+(?:airflow\b|airflow_backfill_provider\.(?:operators|triggers|ui|factory|live_factory"
    r"|loader|configcheck|timetables|assets|__main__|core\.compat)\b"
    r"|airflow_backfill_provider\s+import\s+.*\b(?:factory|live_factory|loader|configcheck|timetables|assets)\b)",
    re.M,
)
#: folders whose every test drives Airflow (clusters, kills of task processes, the UI)
_AIRFLOW_DIRS = {"e2e", "faults", "operators", "ui"}
_drives_airflow: dict[str, bool] = {}


def _module_drives_airflow(module) -> bool:
    path = getattr(module, "__file__", None) or ""
    if path not in _drives_airflow:
        try:
            text = Path(path).read_text()
        except OSError:
            text = ""
        _drives_airflow[path] = Path(path).parent.name in _AIRFLOW_DIRS or bool(_DRIVES_AIRFLOW.search(text))
    return _drives_airflow[path]


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        name = module.__name__.rsplit(".", 1)[-1] if module is not None else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        # `make test-af2` (the secondary version) runs these: what is not marked exercises PostgreSQL through
        # the stages below the Airflow surface, the same code on both versions, and runs once, on 3.3
        if "airflow_db" in fixtures or (module is not None and _module_drives_airflow(module)):
            item.add_marker(pytest.mark.airflow)
        if "airflow_db" in fixtures or name in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        # `make unit` runs what is not `db` with no server to reach (a closed port): a test that needs one and
        # is not marked fails there
        if fixtures & DB_FIXTURES or name in DB_MODULES:
            item.add_marker(pytest.mark.db)
