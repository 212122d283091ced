"""Open psycopg2 sessions from Airflow connection ids, with the settings that change results pinned.

Connection parameters come from the postgres provider's own ``PostgresHook.get_conn`` logic (host,
login, password from the secrets backend; every extra the hook passes on: ``sslmode`` and
certificates, ``options``, keepalives; IAM/RDS and Azure tokens), so a connection behaves here as it
does for any PostgresHook task. Only the driver differs: on Airflow 3.3 the hook connects with
psycopg 3, on 2.11 with psycopg2; the transfer path streams COPY and builds every statement with
``psycopg2.sql``, so it takes the hook's parameters and connects with psycopg2 on both versions.
The ``cursor`` extra is ignored: the provider reads plain tuples.

Every session then gets, from its first statement (libpq ``options`` and ``client_encoding``, appended
after the user's own ``options`` so they win):

- ``TimeZone`` = the spec's ``timezone`` (the declared meaning of naive timestamps; UTC without a spec),
  ``DateStyle=ISO,MDY``, ``IntervalStyle=postgres``, ``extra_float_digits=3``, ``lc_monetary=C``,
  ``array_nulls=on``, ``xmloption=content``, ``bytea_output=hex``, ``client_encoding=UTF8``: results never
  depend on a server's or database's defaults;
- TCP keepalives and ``tcp_user_timeout`` (defaults below; a connection's extras override them) and
  ``connect_timeout``: a vanished peer ends the session within about a minute;
- on sessions with a ``statement_timeout``, a client-side deadline per statement (``core/deadlines.py``).

A connection without a host or database is refused instead of falling back to libpq's defaults (a
local socket, a database named after the user). Secrets never appear in code, specs or logs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extensions

from airflow_backfill_provider.core.deadlines import GRACE_S, DeadlineConnection
from airflow_backfill_provider.core.dsn import is_dsn
from airflow_backfill_provider.core.exceptions import PermanentChunkError

if TYPE_CHECKING:
    from airflow_backfill_provider.core.spec import BackfillSpec

#: network defaults, each overridable from the connection's extras (or the DSN):
#: an idle session whose peer vanished ends after 30 + 3 * 10 s of unanswered keepalive probes; data
#: sent and not acknowledged for 60 s ends it too (tcp_user_timeout, milliseconds)
NETWORK_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}

# parameters of the hook's connect call that only mean something to its own driver/cursor setup
_HOOK_ONLY = ("cursor_factory", "row_factory")


def timeout_ms(seconds: float) -> int:
    """A timeout as PostgreSQL milliseconds, never 0 (which means "no timeout"): rounded up, at least 1."""
    return max(1, math.ceil(seconds * 1000))


def _not_found(conn_id: str) -> PermanentChunkError:
    return PermanentChunkError(
        f"Airflow connection {conn_id!r} does not exist: create it in Admin -> Connections, "
        f"with `airflow connections add {conn_id} --conn-uri postgresql://user:pass@host:5432/db`, "
        f"or set AIRFLOW_CONN_{conn_id.upper()}"
    )


def _hook_params(conn_id: str, connection=None) -> dict[str, Any]:
    """What ``PostgresHook(conn_id).get_conn()`` would pass to its driver's connect, without connecting."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    if not hasattr(PostgresHook, "_create_connection"):  # the one seam we rely on; fail loudly if it moves
        raise RuntimeError(
            "this apache-airflow-providers-postgres has no PostgresHook._create_connection; "
            "airflow-backfill-provider supports 7.x (pinned in its requirements; tests/test_connections_seam.py)"
        )
    hook = PostgresHook(postgres_conn_id=conn_id, connection=connection)
    try:
        hook.connection  # noqa: B018 - resolve now, so a missing id gets our message
    except Exception as err:  # AirflowNotFoundException differs by version
        raise _not_found(conn_id) from err
    captured: dict[str, Any] = {}

    def capture(conn_args: dict[str, Any]):
        captured.update(conn_args)

    hook._create_connection = capture  # the hook builds conn_args (extras, options, IAM); we connect
    hook.get_conn()
    params = {k: v for k, v in captured.items() if k not in _HOOK_ONLY and v is not None}
    if not params.get("host"):
        raise PermanentChunkError(
            f"Airflow connection {conn_id!r} has no host: set its host (a name, an IP address, or a Unix "
            "socket directory such as /var/run/postgresql); the provider does not fall back to libpq's default"
        )
    if not params.get("dbname"):
        raise PermanentChunkError(
            f"Airflow connection {conn_id!r} has no database: set its 'schema' field (Airflow's name for the "
            "database); the provider does not fall back to libpq's default (a database named like the user)"
        )
    return params


def connection_kwargs(conn_id_or_dsn: str, *, outside_task: bool = False) -> dict[str, Any]:
    """psycopg2.connect kwargs for an Airflow connection id (or a libpq DSN/URI, for tests and scripts).

    ``outside_task``: the caller is not a task (the ``status`` CLI, the progress page): look the id up as the
    ``airflow`` CLI does (compat.get_connection_outside_task), the metadata database included on Airflow 3."""
    if is_dsn(conn_id_or_dsn):
        return psycopg2.extensions.parse_dsn(conn_id_or_dsn)
    if not outside_task:
        return _hook_params(conn_id_or_dsn)
    from airflow_backfill_provider.core.compat import get_connection_outside_task

    try:
        conn = get_connection_outside_task(conn_id_or_dsn)
    except Exception as err:  # AirflowNotFoundException differs by version
        raise _not_found(conn_id_or_dsn) from err
    return _hook_params(conn_id_or_dsn, conn)


async def aconnection_kwargs(conn_id_or_dsn: str) -> dict[str, Any]:
    """:func:`connection_kwargs` for async code (triggers): never blocks the event loop."""
    if is_dsn(conn_id_or_dsn):
        return psycopg2.extensions.parse_dsn(conn_id_or_dsn)
    import asyncio

    from airflow_backfill_provider.core.compat import aget_connection

    try:
        conn = await aget_connection(conn_id_or_dsn)
    except Exception as err:  # AirflowNotFoundException differs by version
        raise _not_found(conn_id_or_dsn) from err
    # token fetches (IAM) may block: build the parameters in a thread
    return await asyncio.to_thread(_hook_params, conn_id_or_dsn, conn)


def connect(
    conn_id_or_dsn: str,
    *,
    application_name: str,
    timezone: str = "UTC",
    readonly: bool = False,
    statement_timeout_s: float | None = None,
    lock_timeout_s: float | None = None,
    idle_in_transaction_timeout_s: float | None = None,
    outside_task: bool = False,
) -> psycopg2.extensions.connection:
    """A psycopg2 session with the settings a backfill needs (see the module docstring).

    ``timezone``: the session TimeZone, i.e. the spec's ``timezone`` wherever a spec is at hand.
    ``application_name`` lets a DBA see which DAG and chunk a session is. ``outside_task``: see
    :func:`connection_kwargs`.
    """
    return open_connection(
        connection_kwargs(conn_id_or_dsn, outside_task=outside_task),
        application_name=application_name,
        timezone=timezone,
        readonly=readonly,
        statement_timeout_s=statement_timeout_s,
        lock_timeout_s=lock_timeout_s,
        idle_in_transaction_timeout_s=idle_in_transaction_timeout_s,
    )


def _option(name: str, value: Any) -> str:
    # libpq splits options on whitespace; a backslash escapes the next character
    text = str(value).replace("\\", "\\\\").replace(" ", "\\ ")
    return f"-c {name}={text}"


def session_options(
    *,
    timezone: str,
    readonly: bool = False,
    statement_timeout_s: float | None = None,
    lock_timeout_s: float | None = None,
    idle_in_transaction_timeout_s: float | None = None,
) -> list[str]:
    """The ``-c`` settings every session gets (values we format ourselves or validated in the spec)."""
    opts = [
        _option("TimeZone", timezone),
        _option("DateStyle", "ISO,MDY"),
        _option("IntervalStyle", "postgres"),
        _option("extra_float_digits", 3),
        # how values are written and read back: text COPY of money follows lc_monetary (C: '$1,234.50'
        # on both ends, the same stored amount as binary COPY); with array_nulls off an unquoted NULL array
        # element reads as the string 'NULL'; with xmloption document an XML content fragment is refused
        _option("lc_monetary", "C"),
        _option("array_nulls", "on"),
        _option("xmloption", "content"),
        _option("bytea_output", "hex"),
    ]
    if statement_timeout_s is not None:
        opts.append(_option("statement_timeout", timeout_ms(statement_timeout_s)))
    if lock_timeout_s is not None:
        opts.append(_option("lock_timeout", timeout_ms(lock_timeout_s)))
    if idle_in_transaction_timeout_s is not None:
        opts.append(_option("idle_in_transaction_session_timeout", timeout_ms(idle_in_transaction_timeout_s)))
    if readonly:
        opts.append(_option("default_transaction_read_only", "on"))
    return opts


def open_connection(
    kwargs: dict[str, Any],
    *,
    application_name: str,
    timezone: str = "UTC",
    readonly: bool = False,
    statement_timeout_s: float | None = None,
    lock_timeout_s: float | None = None,
    idle_in_transaction_timeout_s: float | None = None,
) -> psycopg2.extensions.connection:
    """:func:`connect` from already resolved kwargs (a trigger resolves them once, asynchronously).

    ``idle_in_transaction_timeout_s``: the server rolls back and ends the session when it has waited that
    long for the client inside a transaction (a client behind a network that went silent never returns)."""
    kwargs = {**NETWORK_DEFAULTS, **kwargs}
    ours = session_options(
        timezone=timezone,
        readonly=readonly,
        statement_timeout_s=statement_timeout_s,
        lock_timeout_s=lock_timeout_s,
        idle_in_transaction_timeout_s=idle_in_transaction_timeout_s,
    )
    # appended after the user's options (e.g. -c search_path=...): for a setting given twice, ours wins
    kwargs["options"] = " ".join([str(kwargs.get("options") or ""), *ours]).strip()
    kwargs["client_encoding"] = "UTF8"  # what the COPY pipe and psycopg2 decode assume
    kwargs["application_name"] = application_name[:63]  # PostgreSQL truncates at NAMEDATALEN-1
    conn = psycopg2.connect(connection_factory=DeadlineConnection, **kwargs)
    if statement_timeout_s is not None:
        conn.client_deadline_s = statement_timeout_s + GRACE_S
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


def application_name(dag_id: str, chunk_id: str) -> str:
    """What a DBA sees in pg_stat_activity; the throttle excludes sessions with this prefix."""
    return f"backfill:{dag_id}:{chunk_id}"


def open_source(
    spec: BackfillSpec, appname: str, source: str | None = None, *, statement_timeout_s: float | None = None
):
    """A source session: read-only, in the spec's timezone, with its statement and lock timeouts
    (``statement_timeout_s``: a shorter one, e.g. the plan's catalog reads). ``source``: another
    connection id or DSN than the spec's."""
    return connect(
        source or spec.source_conn_id,
        application_name=appname,
        timezone=spec.timezone,
        readonly=True,
        statement_timeout_s=statement_timeout_s or spec.statement_timeout_s,
        lock_timeout_s=spec.lock_timeout_s,
    )


def open_destination(spec: BackfillSpec, appname: str, destination: str | None = None, *, bound_idle: bool = True):
    """The chunk's destination session: the spec's lock timeout, and its statement timeout too, so each
    destination statement (staging COPY, upsert, ledger) ends within ``statement_timeout_s`` on the server
    and, behind a network that went silent, within ``statement_timeout_s + GRACE_S`` client-side
    (core/deadlines.py), as source statements do. A server that stops hearing from the session rolls its
    transaction back after ``idle_in_transaction_session_timeout`` (twice ``statement_timeout_s``: the
    session may wait that long for source statements inside its transaction), releasing its locks.
    ``bound_idle=False``: no idle bound, for a read-only session that may wait longer than that inside its
    transaction (validation's destination side waits for all of the source side's statements)."""
    return connect(
        destination or spec.destination_conn_id,
        application_name=appname,
        timezone=spec.timezone,
        statement_timeout_s=spec.statement_timeout_s,
        lock_timeout_s=spec.lock_timeout_s,
        idle_in_transaction_timeout_s=2 * spec.statement_timeout_s if bound_idle else None,
    )
