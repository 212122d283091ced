"""Shared fixtures: throwaway source/destination databases on a real PostgreSQL server.

Set BACKFILL_TEST_PG_URL to point at another server (default: postgresql://postgres@127.0.0.1:5432/postgres).
Databases are created per test session with a random suffix, so parallel runs do not collide.
"""

from __future__ import annotations

import os
import uuid

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
            "Start one (`make pg` or scripts/ensure_postgres.sh) or set BACKFILL_TEST_PG_URL.",
            returncode=3,
        )
    conn.autocommit = True
    return conn


def db_url(dbname: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{dbname}"


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
