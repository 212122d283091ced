"""Which database errors a retry can fix (transient) and which it cannot (permanent).

Classified by SQLSTATE, so it does not depend on message text or driver version.
"""

from __future__ import annotations

import psycopg2

from airflow_backfill_provider.exceptions import PermanentChunkError, TransientChunkError

# SQLSTATE classes/codes a retry can fix
_TRANSIENT_CLASSES = ("08", "53", "57", "58", "40")  # connection, resources, operator intervention, system, rollback
_TRANSIENT_CODES = {"55P03", "55006", "57014"}  # lock_not_available, object_in_use, query_canceled (timeouts)
_HINTS = {
    "42P01": "a table is missing: check source_table / destination_table",
    "42703": "a column is missing: check the spec's columns, time_column, key_columns, version_column",
    "42P10": "no unique constraint matches key_columns: add a unique index on exactly those columns",
    "21000": "the source has duplicate keys within one chunk: key_columns must be unique in the source",
    "42501": "permission denied: grant SELECT on the source and INSERT/UPDATE on the destination",
}


def is_transient(err: BaseException) -> bool:
    if isinstance(err, TransientChunkError):
        return True
    if isinstance(err, PermanentChunkError):
        return False
    code = getattr(err, "pgcode", None)
    if code is None:
        # no SQLSTATE: connection dropped or server gone (psycopg2.OperationalError / InterfaceError)
        return isinstance(err, (psycopg2.OperationalError, psycopg2.InterfaceError, OSError))
    return code in _TRANSIENT_CODES or code[:2] in _TRANSIENT_CLASSES


def classify(
    err: BaseException, *, chunk_id: str, source_conn=None, statement_timeout_s: float | None = None
) -> Exception:
    """Wrap any failure of a chunk as Transient (retry) or Permanent (fail now), with a useful message.

    ``source_conn`` lets a timeout name its side: the source session is the one with statement_timeout.
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
    if is_transient(err):
        hint = ""
        if code == "55P03":
            hint = " (lock_timeout: another session, e.g. live ingest or a second run of this chunk, holds the lock)"
        side = " on the source" if _raised_by(err, source_conn) else ""
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
