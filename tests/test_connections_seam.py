"""The one seam into the postgres provider: connections.py lets ``PostgresHook.get_conn`` build its driver's
connect arguments (extras, options, IAM tokens) and captures them through ``PostgresHook._create_connection``,
a private method. So the provider's major version is pinned in pyproject.toml, and these tests check, on the
installed provider (psycopg 3 under Airflow 3.3, psycopg2 under 2.11), that the capture still sees what the
hook's own connection gets."""

from __future__ import annotations

import json
import tomllib
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from airflow_backfill_provider.connections import connect, connection_kwargs
from tests.conftest import REPO
from tests.session_helpers import dbname, run_sql, server_address

CONN_ID = "bf_seam"


def _declared(name: str) -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def test_the_provider_major_is_pinned_and_installed_within_the_pin():
    req = _declared("apache-airflow-providers-postgres")
    uppers = [s for s in req.specifier if s.operator == "<"]
    assert uppers, f"{req}: no upper bound; connections.py relies on a private method of this provider"
    assert all(s.version.split(".")[1:] in ([], ["0"]) for s in uppers), f"{req}: bound the major version only"
    installed = version("apache-airflow-providers-postgres")
    assert req.specifier.contains(installed), f"installed {installed} is outside {req}: re-check the seam"


def _airflow_conn(monkeypatch, src_url):
    host, port = server_address()
    fields = {
        "conn_type": "postgres",
        "host": host,
        "port": port,
        "login": "postgres",
        "schema": dbname(src_url),
        # what only the hook's own resolution knows: extras passed on to the driver, one it drops (cursor)
        "extra": {
            "options": "-c search_path=seam_schema",
            "sslmode": "disable",
            "keepalives_idle": 7,
            "cursor": "dictcursor",
        },
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(fields))


def _facts(conn):
    cur = conn.cursor()
    cur.execute(
        "SELECT current_user AS u, current_database() AS d, current_setting('search_path') AS p, "
        "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()) AS s"
    )
    row = cur.fetchone()
    cur.close()
    return row


def test_captured_arguments_open_the_session_the_hook_opens(monkeypatch, src_url):
    """The hook's own connection (its driver, its cursor extra) and ours reach the same database as the same
    user with the same extras applied; ours gets the extras as plain connect arguments."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    run_sql(src_url, "CREATE SCHEMA seam_schema")
    _airflow_conn(monkeypatch, src_url)
    kwargs = connection_kwargs(CONN_ID)
    assert kwargs["options"] == "-c search_path=seam_schema" and kwargs["sslmode"] == "disable"
    assert kwargs["keepalives_idle"] == 7 and kwargs["dbname"] == dbname(src_url)
    assert not {"cursor", "cursor_factory", "row_factory"} & set(kwargs)

    theirs = PostgresHook(postgres_conn_id=CONN_ID).get_conn()
    try:
        expected = _facts(theirs)
    finally:
        theirs.close()
    # rows by column name: the cursor extra reached the hook's own connection (psycopg 3 dict_row, psycopg2 DictCursor)
    expected = tuple(expected[k] for k in ("u", "d", "p", "s"))
    ours = connect(CONN_ID, application_name="seam")
    try:
        assert _facts(ours) == expected == ("postgres", dbname(src_url), "seam_schema", False)
        assert ours.get_dsn_parameters()["keepalives_idle"] == "7"
    finally:
        ours.close()


def test_a_provider_without_the_seam_fails_loudly(monkeypatch, src_url):
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    _airflow_conn(monkeypatch, src_url)
    monkeypatch.delattr(PostgresHook, "_create_connection")
    with pytest.raises(RuntimeError, match="_create_connection"):
        connection_kwargs(CONN_ID)
