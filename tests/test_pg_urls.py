"""The test server's URL may name a Unix-socket folder (the private server scripts/pg.sh starts has one):
URLs built from it for other databases keep the host, however it is written."""

from __future__ import annotations

import psycopg2
import pytest

from tests.conftest import db_url


@pytest.mark.parametrize(
    "admin, expected",
    [
        ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/bf_x"),
        (
            "postgresql://postgres@/postgres?host=/run/pg&port=5433",
            "postgresql://postgres@/bf_x?host=/run/pg&port=5433",
        ),
        ("postgresql://postgres@%2Frun%2Fpg:5433/postgres", "postgresql://postgres@%2Frun%2Fpg:5433/bf_x"),
        ("postgresql://u:p%2Fw@h/postgres", "postgresql://u:p%2Fw@h/bf_x"),
    ],
)
def test_db_url_changes_only_the_database(admin, expected):
    assert db_url("bf_x", admin) == expected
    assert psycopg2.extensions.parse_dsn(db_url("bf_x", admin))["dbname"] == "bf_x"
