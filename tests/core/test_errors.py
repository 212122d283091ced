"""core/errors.py on real sessions: an error without SQLSTATE is transient when its session is broken, whatever the
message; an error with a permanent SQLSTATE stays permanent.

psycopg2 raises "error with status PGRES_COPY_OUT and no message from the libpq" as a bare DatabaseError with no
cursor and no SQLSTATE (PyErr_Format in pq_raise), at a moment the server cannot be made to pick; those tests build
that exception as psycopg2 does and classify it against real sessions, terminated or alive.
"""

from __future__ import annotations

import io

import psycopg2
import pytest

from airflow_backfill_provider.core.errors import classify, is_transient
from airflow_backfill_provider.core.exceptions import PermanentChunkError, TransientChunkError
from tests.conftest import _admin

NO_MESSAGE = "error with status PGRES_COPY_OUT and no message from the libpq"
NO_MESSAGE_IN = "error with status PGRES_COPY_IN and no message from the libpq"


def _session(url: str):
    conn = psycopg2.connect(url)
    conn.set_session(readonly=True)  # as a source session: in a transaction, not autocommit
    return conn


def _terminate(conn) -> None:
    """Terminate the session's backend and wait (bounded) until the server says it is gone."""
    admin = _admin()
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s, 10000)", (conn.get_backend_pid(),))
            assert cur.fetchone() == (True,)
    finally:
        admin.close()


def _raised(fn) -> BaseException:
    with pytest.raises(psycopg2.Error) as info:
        fn()
    return info.value


@pytest.fixture()
def sessions(src_url):
    opened: list = []

    def _open():
        conn = _session(src_url)
        opened.append(conn)
        return conn

    yield _open
    for conn in opened:
        conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "COPY (SELECT g FROM generate_series(1, 10) g) TO STDOUT",
        "COPY pg_temp.missing FROM STDIN",
        "SELECT 1",
    ],
)
def test_statement_on_a_terminated_session_is_transient(sessions, statement):
    conn = sessions()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")  # inside a transaction, as a chunk's source session is
    _terminate(conn)
    with conn.cursor() as cur:
        if statement.startswith("COPY"):
            err = _raised(lambda: cur.copy_expert(statement, io.BytesIO(b"1\n")))
        else:
            err = _raised(lambda: cur.execute(statement))
    assert err.pgcode is None and conn.closed, (err, conn.closed)
    assert is_transient(err)
    out = classify(err, chunk_id="c", source_conn=conn)
    assert isinstance(out, TransientChunkError) and "on the source" in str(out), out


@pytest.mark.parametrize("message", [NO_MESSAGE, NO_MESSAGE_IN])
def test_no_message_error_on_a_terminated_session_libpq_has_not_noticed_is_transient(sessions, message):
    """The case of issue 25: the server ended the session but libpq has not read that yet (closed == 0), so only
    a round trip on the session tells; the message alone says nothing about the connection."""
    src, dst = sessions(), sessions()
    _terminate(src)
    assert src.closed == 0, "libpq noticed before the classification: the test no longer tests the probe"
    err = psycopg2.DatabaseError(message)
    out = classify(err, chunk_id="c", source_conn=src, conns=(dst,))
    assert isinstance(out, TransientChunkError), out
    assert "on the source" in str(out), out
    assert src.closed  # the probe found it broken
    assert dst.closed == 0 and dst.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_no_message_error_on_a_session_psycopg2_marked_closed_is_transient(sessions):
    dst = sessions()
    _terminate(dst)
    with pytest.raises(psycopg2.OperationalError):
        dst.cursor().execute("SELECT 1")
    assert dst.closed == 2
    out = classify(psycopg2.DatabaseError(NO_MESSAGE_IN), chunk_id="c", source_conn=None, conns=(dst,))
    assert isinstance(out, TransientChunkError) and "on the source" not in str(out), out


def test_no_message_error_on_live_sessions_stays_permanent_and_leaves_them_as_they_were(sessions):
    src, dst = sessions(), sessions()
    with dst.cursor() as cur:
        cur.execute("SELECT 1")  # dst mid-transaction: the probe must not end it
    out = classify(psycopg2.DatabaseError(NO_MESSAGE), chunk_id="c", source_conn=src, conns=(dst,))
    assert isinstance(out, PermanentChunkError), out
    assert src.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE  # probe rolled back
    assert dst.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS


def test_a_failed_transaction_answers_the_probe_so_the_session_is_alive(sessions):
    conn = sessions()
    with pytest.raises(psycopg2.errors.DivisionByZero):
        conn.cursor().execute("SELECT 1/0")
    # the probe gets 25P02 (in failed transaction): a server answered
    assert not is_transient(psycopg2.DatabaseError(NO_MESSAGE), (conn,))
    assert conn.closed == 0


def test_permanent_sqlstate_stays_permanent_when_the_session_breaks_afterwards(sessions):
    conn = sessions()
    err = _raised(lambda: conn.cursor().execute("SELECT * FROM no_such_table"))
    assert err.pgcode == "42P01"
    _terminate(conn)
    assert not is_transient(err, (conn,))
    out = classify(err, chunk_id="c", source_conn=conn)
    assert isinstance(out, PermanentChunkError) and "42P01" in str(out), out


@pytest.mark.parametrize(
    "message",
    [
        "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally",
        "SSL SYSCALL error: EOF detected",
        "could not receive data from server: Connection reset by peer",
    ],
)
def test_lost_connection_text_is_transient_when_no_session_can_be_checked(message):
    assert is_transient(psycopg2.DatabaseError(message))


def test_no_sqlstate_error_without_session_or_lost_connection_text_stays_permanent():
    assert not is_transient(psycopg2.DatabaseError(NO_MESSAGE))
    assert not is_transient(psycopg2.ProgrammingError("can't execute COPY TO: use the copy_to() method instead"))
    assert not is_transient(ValueError("a bug"))
