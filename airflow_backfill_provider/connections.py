"""Open psycopg2 connections from Airflow connection ids.

Why not ``PostgresHook.get_conn()``: on Airflow 3.3 it returns a psycopg 3 connection, on 2.11 a
psycopg2 one. The transfer path streams COPY and builds every statement with ``psycopg2.sql``, so it
uses one driver on both versions: the hook only resolves the Airflow connection (host, login,
password from the secrets backend); secrets never appear in code or specs.
"""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.extensions

from airflow_backfill_provider.exceptions import PermanentChunkError

# libpq keywords that may come from a connection's extras; anything else in extras is ignored.
_LIBPQ_EXTRAS = {
    "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "connect_timeout", "keepalives",
    "keepalives_idle", "keepalives_interval", "keepalives_count", "target_session_attrs",
    "options", "gssencmode", "sslcompression", "tcp_user_timeout",
}


def _is_dsn(value: str) -> bool:
    return "://" in value or "=" in value


def _not_found(conn_id: str) -> PermanentChunkError:
    return PermanentChunkError(
        f"Airflow connection {conn_id!r} does not exist: create it in Admin -> Connections, "
        f"with `airflow connections add {conn_id} --conn-uri postgresql://user:pass@host:5432/db`, "
        f"or set AIRFLOW_CONN_{conn_id.upper()}"
    )


def _kwargs_from_airflow_connection(conn) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "host": conn.host or "localhost",
        "port": conn.port or 5432,
        "user": conn.login,
        "password": conn.password,
        "dbname": getattr(conn, "schema", None) or "postgres",
    }
    extras = conn.extra_dejson or {}
    kwargs.update({k: v for k, v in extras.items() if k in _LIBPQ_EXTRAS})
    return {k: v for k, v in kwargs.items() if v is not None}


def connection_kwargs(conn_id_or_dsn: str) -> dict[str, Any]:
    """psycopg2.connect kwargs for an Airflow connection id (or a libpq DSN/URI, for tests and scripts)."""
    if _is_dsn(conn_id_or_dsn):
        return {"dsn": conn_id_or_dsn}
    from airflow_backfill_provider.compat import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id_or_dsn)
    except Exception as err:  # AirflowNotFoundException differs by version
        raise _not_found(conn_id_or_dsn) from err
    return _kwargs_from_airflow_connection(conn)


async def aconnection_kwargs(conn_id_or_dsn: str) -> dict[str, Any]:
    """:func:`connection_kwargs` for async code (triggers): never blocks the event loop."""
    if _is_dsn(conn_id_or_dsn):
        return {"dsn": conn_id_or_dsn}
    from airflow_backfill_provider.compat import aget_connection

    try:
        conn = await aget_connection(conn_id_or_dsn)
    except Exception as err:  # AirflowNotFoundException differs by version
        raise _not_found(conn_id_or_dsn) from err
    return _kwargs_from_airflow_connection(conn)


def connect(
    conn_id_or_dsn: str,
    *,
    application_name: str,
    readonly: bool = False,
    statement_timeout_s: float | None = None,
    lock_timeout_s: float | None = None,
) -> psycopg2.extensions.connection:
    """A psycopg2 connection with the session settings a backfill needs.

    Settings go through libpq ``options`` (numbers we format ourselves, never user text), so they hold
    from the first statement; ``application_name`` lets a DBA see which DAG and chunk a session is.
    """
    return open_connection(
        connection_kwargs(conn_id_or_dsn),
        application_name=application_name,
        readonly=readonly,
        statement_timeout_s=statement_timeout_s,
        lock_timeout_s=lock_timeout_s,
    )


def open_connection(
    kwargs: dict[str, Any],
    *,
    application_name: str,
    readonly: bool = False,
    statement_timeout_s: float | None = None,
    lock_timeout_s: float | None = None,
) -> psycopg2.extensions.connection:
    """:func:`connect` from already resolved kwargs (a trigger resolves them once, asynchronously)."""
    kwargs = dict(kwargs)
    opts = []
    if statement_timeout_s is not None:
        opts.append(f"-c statement_timeout={int(statement_timeout_s * 1000)}")
    if lock_timeout_s is not None:
        opts.append(f"-c lock_timeout={int(lock_timeout_s * 1000)}")
    if readonly:
        opts.append("-c default_transaction_read_only=on")
    if opts:
        kwargs["options"] = " ".join([kwargs.get("options", ""), *opts]).strip()
    kwargs["application_name"] = application_name[:63]  # PostgreSQL truncates at NAMEDATALEN-1
    conn = psycopg2.connect(**kwargs)
    if readonly:
        conn.set_session(readonly=True)
    return conn


def rollback_quietly(conn) -> None:
    """Roll back after a failure; if the connection is already gone the server has rolled back anyway."""
    if conn is not None and not conn.closed:
        try:
            conn.rollback()
        except Exception:  # noqa: BLE001 - the original error is the one worth raising
            pass


def close_all(*conns) -> None:
    for conn in conns:
        if conn is not None and not conn.closed:
            conn.close()
