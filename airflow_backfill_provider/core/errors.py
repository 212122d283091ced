"""Which database errors a retry can fix (transient) and which it cannot (permanent).

The rule:

1. An error with an SQLSTATE is classified by it alone (below), so it does not depend on message text or driver
   version: a permanent SQLSTATE stays permanent even if the session broke afterwards.
2. An error without an SQLSTATE comes from the driver or libpq, not from the server. It is transient when it is an
   ``OperationalError``/``InterfaceError``/``OSError``, or when **the session it came from is broken**. psycopg2
   raises a plain ``DatabaseError`` for a session that died under it before libpq marked it bad (e.g. "error with
   status PGRES_COPY_OUT and no message from the libpq" when the source backend is terminated mid-COPY) and such
   an error names no cursor, so the caller's sessions are checked: broken means psycopg2 marked it closed
   (``conn.closed``), libpq reports its state unknown, or a ``SELECT 1`` on it fails without an SQLSTATE (no
   server answered). A session whose server still answers is not broken: the error stays permanent.
3. Secondary signal, for a session that cannot be checked: libpq's own texts for a lost connection.
"""

from __future__ import annotations

import psycopg2
import psycopg2.extensions

from airflow_backfill_provider.core.exceptions import PermanentChunkError, TransientChunkError

# SQLSTATE classes/codes a retry can fix
_TRANSIENT_CLASSES = ("08", "53", "57", "58", "40")  # connection, resources, operator intervention, system, rollback
_TRANSIENT_CODES = {"55P03", "55006", "57014"}  # lock_not_available, object_in_use, query_canceled (timeouts)
# libpq's texts for a connection that is gone (never sent by a server, so never carry an SQLSTATE)
_LOST_CONNECTION = (
    "server closed the connection unexpectedly",
    "SSL SYSCALL error",
    "SSL connection has been closed unexpectedly",
    "EOF detected",
    "could not receive data from server",
    "could not send data to server",
    "no connection to the server",
    "connection already closed",
    "lost synchronization with server",
)
_HINTS = {
    "42P01": "a table is missing: check source_table / destination_table",
    "42703": "a column is missing: check the spec's columns, time_column, key_columns, version_column",
    "42P10": "no unique constraint matches key_columns: add a unique index on exactly those columns",
    "21000": "the source has duplicate keys within one chunk: key_columns must be unique in the source",
    "42501": "permission denied: grant SELECT on the source and INSERT/UPDATE on the destination",
}


def is_transient(err: BaseException, conns=()) -> bool:
    """See the module docstring; ``conns`` are the sessions the error may have come from (None entries skipped)."""
    if isinstance(err, TransientChunkError):
        return True
    if isinstance(err, PermanentChunkError):
        return False
    code = getattr(err, "pgcode", None)
    if code is not None:
        return code in _TRANSIENT_CODES or code[:2] in _TRANSIENT_CLASSES
    if isinstance(err, (psycopg2.OperationalError, psycopg2.InterfaceError, OSError)):
        return True
    if not isinstance(err, psycopg2.Error):
        return False  # a bug in our code or the driver's misuse: a retry would fail the same way
    return broken_session(err, conns) is not None or any(text in str(err) for text in _LOST_CONNECTION)


def broken_session(err: BaseException, conns=()):
    """The broken session among the one ``err`` names (its cursor's) or else ``conns``; None if all answer."""
    cursor = getattr(err, "cursor", None)
    candidates = [cursor.connection] if cursor is not None else [c for c in conns if c is not None]
    return next((conn for conn in candidates if _is_broken(conn)), None)


def _is_broken(conn) -> bool:
    if conn.closed:  # psycopg2 marks a session closed (2) once libpq reports it bad
        return True
    if not isinstance(conn, psycopg2.extensions.connection):
        return False
    status = conn.get_transaction_status()
    if status == psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN:  # libpq: the connection is bad
        return True
    # libpq may not have noticed yet: one round trip tells. Any answer with an SQLSTATE (e.g. 25P02, a failed
    # transaction) means a server answered, so the session is alive.
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        if status == psycopg2.extensions.TRANSACTION_STATUS_IDLE and not conn.autocommit:
            conn.rollback()  # the probe opened a transaction: leave the session as it was
    except psycopg2.Error as probe_err:
        return probe_err.pgcode is None
    return False


def classify(
    err: BaseException,
    *,
    chunk_id: str,
    source_conn=None,
    statement_timeout_s: float | None = None,
    conns=(),
) -> Exception:
    """Wrap any failure of a chunk as Transient (retry) or Permanent (fail now), with a useful message.

    ``source_conn`` lets a timeout name its side: the source session is the one with statement_timeout.
    ``conns`` are the chunk's other sessions: an error without SQLSTATE is transient if one of them is broken.
    """
    if isinstance(err, (TransientChunkError, PermanentChunkError)):
        return err
    code = getattr(err, "pgcode", None)
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if code == "57014" and "statement timeout" in detail and _raised_by(err, source_conn):
        limit = f" ({statement_timeout_s:g} s)" if statement_timeout_s is not None else ""
        return TransientChunkError(
            f"chunk {chunk_id}: statement_timeout{limit} hit on the source (SQLSTATE 57014), will be retried: "
            "the chunk's query ran longer than the spec's statement_timeout_s; if it keeps failing, use a "
            "smaller granularity, index the time column, or raise statement_timeout_s"
        )
    if code == "57014" and "statement timeout" in detail and getattr(err, "cursor", None) is not None:
        limit = f" ({statement_timeout_s:g} s)" if statement_timeout_s is not None else ""
        return TransientChunkError(
            f"chunk {chunk_id}: statement_timeout{limit} hit on the destination (SQLSTATE 57014), will be retried: "
            "the staging COPY, upsert or ledger write ran longer than the spec's statement_timeout_s (it bounds "
            "destination statements too); if it keeps failing, use a smaller granularity or raise statement_timeout_s"
        )
    sessions = (source_conn, *conns)
    if is_transient(err, sessions):
        hint = ""
        if code == "55P03":
            hint = " (lock_timeout: another session, e.g. live ingest or a second run of this chunk, holds the lock)"
        from_source = _raised_by(err, source_conn) or (
            code is None and source_conn is not None and broken_session(err, sessions) is source_conn
        )
        side = " on the source" if from_source else ""
        return TransientChunkError(
            f"chunk {chunk_id}: transient error{side} (SQLSTATE {code}), will be retried: {detail}{hint}"
        )
    hint = _HINTS.get(code or "", "")
    if code and code.startswith("22"):
        hint = "a value does not fit the destination column type (cast failed)"
    msg = f"chunk {chunk_id}: permanent error (SQLSTATE {code}): {detail}"
    return PermanentChunkError(f"{msg}; {hint}" if hint else msg)


def _raised_by(err: BaseException, conn) -> bool:
    """True if a psycopg2 error came from a cursor of ``conn``."""
    cursor = getattr(err, "cursor", None)
    return conn is not None and cursor is not None and cursor.connection is conn
