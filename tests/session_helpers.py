"""Throwaway databases with hostile defaults (TimeZone, DateStyle, encodings, ...), and a TCP proxy
that goes silent, for the session tests."""

from __future__ import annotations

import select
import socket
import threading
import time
from urllib.parse import urlsplit

import psycopg2
from psycopg2 import sql

from tests.conftest import _admin, db_url

#: what a careless server/database default can look like; each changes results if not pinned
HOSTILE = {
    "timezone": "America/New_York",
    "datestyle": "SQL, DMY",
    "intervalstyle": "sql_standard",
    "extra_float_digits": "0",
}


def dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def set_database_defaults(url: str, **settings: str) -> None:
    """``ALTER DATABASE .. SET`` each setting: the default of every new session on that database."""
    admin = _admin()
    with admin.cursor() as cur:
        for name, value in settings.items():
            cur.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(dbname(url)), sql.Identifier(name), sql.Literal(value)
                )
            )
    admin.close()


def create_database(databases, label: str, encoding: str) -> str:
    """A throwaway database with another encoding (dropped with the others at session end)."""
    name = f"bf_{label}_{databases.tag}_{len(databases.created)}"
    admin = _admin()
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE DATABASE {} ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
                sql.Identifier(name), sql.Literal(encoding)
            )
        )
    admin.close()
    databases.created.append(name)
    return db_url(name)


def run_sql(url: str, statement, params=None, *, setup: str | None = None) -> list[tuple]:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            if setup:
                cur.execute(setup)
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def wait_until(predicate, *, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not true within {timeout} s (last: {value!r})")
        time.sleep(interval)


class SilentProxy:
    """A TCP proxy to PostgreSQL that, once triggered, forwards nothing more in either direction.

    It keeps every socket open (its kernel still acknowledges data and keepalive probes), like a hung
    proxy or load balancer: only a client-side deadline ends a session behind it. ``trigger``: bytes
    in a client's message that make the proxy go silent, after forwarding ``grace_bytes`` more bytes
    of the server's answer (so a COPY can be cut mid-stream). New connections then hang too.
    """

    def __init__(self, upstream=None, *, trigger: bytes, grace_bytes: int = 0):
        self.upstream, self.trigger, self.grace_bytes = upstream or server_address(), trigger, grace_bytes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.silent = threading.Event()
        self.triggered = threading.Event()
        self._left = grace_bytes
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = [self.listener]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, dbname_: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname_}?sslmode=disable"

    def _accept(self):
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool):
        while not self._stop.is_set():
            if self.silent.is_set():
                self._stop.wait(0.2)  # hold the socket, read nothing, send nothing
                continue
            ready, _, _ = select.select([src], [], [], 0.2)
            if not ready:
                continue
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if from_client and self.trigger in data:
                self.triggered.set()
            if not from_client and self.triggered.is_set():
                with self._lock:
                    data = data[: max(self._left, 0)]
                    self._left -= len(data)
                    if self._left <= 0:
                        self.silent.set()
            if from_client and self.triggered.is_set() and self.grace_bytes == 0:
                self.silent.set()
                data = data if self.trigger in data else b""
            try:
                if data:
                    dst.sendall(data)
            except OSError:
                return

    def close(self):
        self._stop.set()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


def server_address() -> tuple[str, int]:
    """(host, port) of the test server (BACKFILL_TEST_PG_URL, or the private one scripts/pg.sh started)."""
    from urllib.parse import urlparse

    from tests.conftest import ADMIN_URL

    parsed = urlparse(ADMIN_URL)
    return parsed.hostname or "127.0.0.1", parsed.port or 5432
