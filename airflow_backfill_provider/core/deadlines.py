"""Client-side deadlines: a statement whose server stops answering ends anyway.

TCP keepalives and ``tcp_user_timeout`` (set on every session, see ``connections.py``) end a session
whose peer vanished (a cut link, a dead host). They do not end one behind a middlebox that keeps the
TCP connection alive and forwards nothing (a hung proxy or load balancer): its kernel acknowledges
every probe. The server's ``statement_timeout`` cannot help either: its error never arrives.

So on a session with a ``statement_timeout``, every statement also gets a client-side deadline of
``statement_timeout + GRACE_S``: by then a reachable server has answered or cancelled the statement.
When it passes, one watchdog thread shuts the session's socket down; libpq sees end-of-file, the
statement raises :class:`StalledError` (an ``OperationalError``: transient, retried) and the caller's
normal cleanup runs (rollback of the destination transaction, close).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time

import psycopg2
import psycopg2.extensions

from airflow_backfill_provider.core.interrupts import leave_signals_to_main_thread

#: time a reachable server has, after its own statement_timeout, to report the cancel
GRACE_S = 5.0


class StalledError(psycopg2.OperationalError):
    """The server did not answer within the client-side deadline; the session was cut."""


class _Watchdog:
    """One daemon thread that cuts sessions whose deadline passed (armed per statement)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, psycopg2.extensions.connection]] = {}
        self._fired: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, conn, seconds: float) -> int:
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (time.monotonic() + seconds, conn)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="backfill-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def disarm(self, token: int) -> bool:
        """Forget ``token``; True if its deadline had passed (the session was cut)."""
        with self._cond:
            self._armed.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _run(self) -> None:
        leave_signals_to_main_thread()  # a signal must wake the main thread, not this one
        with self._cond:
            while True:
                now = time.monotonic()
                for token in [t for t, (due, _) in self._armed.items() if due <= now]:
                    _, conn = self._armed.pop(token)
                    self._fired.add(token)
                    # under the lock: the statement is still running (disarm needs the lock), so the
                    # connection and its file descriptor are still the session's own
                    _cut(conn)
                nxt = min((due for due, _ in self._armed.values()), default=None)
                self._cond.wait(timeout=None if nxt is None else max(0.0, nxt - now))

    def _after_fork(self) -> None:  # a forked worker starts with no thread and a fresh lock
        self.__init__()


def _cut(conn) -> None:
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except Exception:  # noqa: BLE001 - already closed: nothing to cut
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv/send on this socket
    except OSError:
        pass
    finally:
        sock.close()


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WATCHDOG._after_fork)


@contextlib.contextmanager
def deadline(conn):
    """Bound the enclosed network call by ``conn.client_deadline_s`` (no bound when it is None)."""
    seconds = getattr(conn, "client_deadline_s", None)
    if seconds is None:
        yield
        return
    token = _WATCHDOG.arm(conn, seconds)
    try:
        yield
    except psycopg2.Error as err:
        if _WATCHDOG.disarm(token):
            raise StalledError(_stalled_message(conn, seconds)) from err
        raise
    finally:
        _WATCHDOG.disarm(token)


def _stalled_message(conn, seconds: float) -> str:
    try:
        where = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
    except Exception:  # noqa: BLE001 - the message matters more than the address
        where = "the server"
    return (
        f"no answer from {where} within {seconds:g} s (the session's statement_timeout + {GRACE_S:g} s): "
        "the network or a proxy in between stalled, so the session was cut client-side; the transaction "
        "was not committed and the chunk can be retried"
    )


class DeadlineCursor(psycopg2.extensions.cursor):
    """A cursor whose network calls are bounded by its connection's ``client_deadline_s``."""

    def execute(self, query, vars=None):
        with deadline(self.connection):
            return super().execute(query, vars)

    def executemany(self, query, vars_list):
        with deadline(self.connection):
            return super().executemany(query, vars_list)

    def copy_expert(self, sql, file, size=8192):
        with deadline(self.connection):
            return super().copy_expert(sql, file, size)

    # a named (server-side) cursor fetches over the network; a client-side one reads memory
    def fetchone(self):
        with deadline(self.connection) if self.name else contextlib.nullcontext():
            return super().fetchone()

    def fetchmany(self, size=None):
        with deadline(self.connection) if self.name else contextlib.nullcontext():
            return super().fetchmany(size) if size is not None else super().fetchmany()

    def fetchall(self):
        with deadline(self.connection) if self.name else contextlib.nullcontext():
            return super().fetchall()


class DeadlineConnection(psycopg2.extensions.connection):
    """psycopg2 connection whose statements, commit and rollback have a client-side deadline."""

    client_deadline_s: float | None = None

    def __init__(self, dsn, *args, **kwargs):
        super().__init__(dsn, *args, **kwargs)
        self.cursor_factory = DeadlineCursor

    def commit(self):
        with deadline(self):
            return super().commit()

    def rollback(self):
        with deadline(self):
            return super().rollback()
