"""Real load on a real PostgreSQL for throttle tests: sessions sleeping in pg_sleep."""

from __future__ import annotations

import threading
import time

import psycopg2


class Sleepers:
    """N extra sessions on a database, each running ``pg_sleep`` in its own thread, until :meth:`end`."""

    def __init__(self, url: str, n: int, *, seconds: float = 120, application_name: str = "bf-test-sleeper"):
        self.conns = [psycopg2.connect(url, application_name=application_name) for _ in range(n)]
        for c in self.conns:
            c.autocommit = True
        self.pids = [c.get_backend_pid() for c in self.conns]
        self.url = url
        self.threads = [threading.Thread(target=self._sleep, args=(c, seconds), daemon=True) for c in self.conns]
        for t in self.threads:
            t.start()
        self._wait_active(url)

    @staticmethod
    def _sleep(conn, seconds):
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(%s)", (seconds,))
        except psycopg2.Error:
            pass  # cancelled by end(): expected

    def _wait_active(self, url: str, timeout: float = 10) -> None:
        """Return once every sleeper shows as active (sessions take a moment to start)."""
        admin = psycopg2.connect(url)
        admin.autocommit = True
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with admin.cursor() as cur:
                    cur.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'active'",
                        (self.pids,),
                    )
                    if cur.fetchone()[0] == len(self.pids):
                        return
                time.sleep(0.05)
            raise AssertionError(f"sleeper sessions {self.pids} did not become active within {timeout} s")
        finally:
            admin.close()

    def end(self) -> None:
        if not self.conns:
            return
        admin = psycopg2.connect(self.url)
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                cur.execute("SELECT pg_cancel_backend(pid) FROM unnest(%s::int[]) AS pid", (self.pids,))
        finally:
            admin.close()
        for t in self.threads:
            t.join(timeout=10)
        for c in self.conns:
            c.close()
        self.conns = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()


def count_probes(trigger) -> list:
    """Record every load probe a SourceLoadTrigger makes (its real probe still runs): a condition to wait on."""
    probes: list = []
    original = trigger._probe_once

    def counting(*args, **kwargs):
        sample = original(*args, **kwargs)
        probes.append(sample)
        return sample

    trigger._probe_once = counting
    return probes


async def wait_until(predicate, what: str, timeout: float = 30, interval: float = 0.02) -> None:
    """Poll ``predicate`` from async code until it is true; fail after ``timeout`` seconds."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(interval)
