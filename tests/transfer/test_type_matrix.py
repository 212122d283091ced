"""Every common PostgreSQL type round-trips exactly through a chunk, in binary and text COPY, with and
without a version column; a rerun rewrites nothing; a change in representation only is rewritten.

One wide table, a few rows per type (typical values, edge values such as NaN/Infinity/-0/infinity,
empty strings and arrays, NULL array elements, and a row of NULLs). The destination has the same types,
plus columns whose type only the destination has (an enum, a domain, citext) loaded from source text
or another enum. Both sides are compared as text of every column under the same (default) settings.
"""

from __future__ import annotations

import pendulum
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.specs import table_spec

TYPES_BOTH = """
CREATE TYPE mood AS ENUM ('happy', 'sad', 'ok');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN mood_d AS mood;
CREATE DOMAIN json_d AS json;
CREATE TYPE pair AS (m mood, n numeric);
"""
TYPES_SOURCE_ONLY = "CREATE TYPE src_mood AS ENUM ('red', 'green');"
TYPES_DEST_ONLY = """
CREATE TYPE dst_mood AS ENUM ('green', 'red', 'blue');
CREATE TYPE label AS ENUM ('a', 'b', 'c');
CREATE DOMAIN email AS text CHECK (VALUE LIKE '%@%');
"""

# (column, type in both tables, values of rows 1..3); row 4 is NULL everywhere but id/at/updated_at
SAME = [
    ("num4", "numeric(12,4)", ["1.2345", "NaN", "-0.0001"]),
    ("num", "numeric", ["1.0", "Infinity", "-1.000000000000000000001"]),
    ("mny", "money", ["12.34", "-0.01", "0"]),
    ("f4", "real", ["1.5", "NaN", "-0"]),
    ("f4b", "real", ["Infinity", "3.4028235e+38", "1e-45"]),
    ("f8", "double precision", ["0.30000000000000004", "NaN", "-0"]),
    ("f8b", "double precision", ["-Infinity", "1.7976931348623157e+308", "5e-324"]),
    ("txt", "text", ["café ☕", "", 'tab\there\nnewline \\ backslash "quote"']),
    ("vc", "varchar(5)", ["abcde", "", "äöü"]),
    ("ch", "char(5)", ["ab", "", "abcde"]),
    ("bya", "bytea", ["\\x00ff", "\\x", "\\x5c0a0d"]),
    ("bo", "boolean", ["true", "false", "true"]),
    ("d", "date", ["2024-02-29", "infinity", "-infinity"]),
    ("tm", "time", ["23:59:59.999999", "00:00", "24:00:00"]),
    ("ttz", "timetz", ["12:00+05:30", "00:00-12", "23:59:59.5+14"]),
    ("ts", "timestamp", ["2024-01-01 12:34:56.789012", "infinity", "4713-01-01 00:00 BC"]),
    ("ts0", "timestamp(0)", ["2024-01-01 12:34:56", "-infinity", "2000-01-01"]),
    ("tstz", "timestamptz", ["2024-03-10 07:00:00+00", "-infinity", "1999-12-31 23:59:59.999999+00"]),
    ("iv", "interval", ["1 mon 2 days 03:04:05.678", "1 day", "-1 year +2 hours"]),
    (
        "uid",
        "uuid",
        [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
        ],
    ),
    ("js", "json", ['{"b": 1,  "a": [1, 2.50]}', '{"a":1,"a":2}', '"x"']),
    ("jb", "jsonb", ['{"a": 1.0}', "[]", "null"]),
    ("ai", "integer[]", ["{1,NULL,3}", "[0:1]={1,2}", "{}"]),
    ("at2", "text[]", ["{{a,b},{c,NULL}}", '{"with space","q\\"uote"}', "{}"]),
    ("an", "numeric[]", ["{1.0,1.00}", "{NaN}", "{}"]),
    ("en", "mood", ["happy", "sad", "ok"]),
    ("ena", "mood[]", ["{happy,sad}", "{}", "{NULL}"]),
    ("dom", "posint", ["1", "2147483647", "42"]),
    ("domen", "mood_d", ["sad", "ok", "happy"]),
    ("domjs", "json_d", ['{"a":  1}', "[]", "1.50"]),
    ("comp", "pair", ["(happy,1.50)", "(,)", "(sad,NaN)"]),
    ("r4", "int4range", ["[1,5)", "empty", "(,)"]),
    ("rn", "numrange", ["(1.0,2.00]", "[0,)", "empty"]),
    ("rt", "tstzrange", ["[2024-01-01 00:00+00,2024-02-01 00:00+00)", "empty", "(,infinity]"]),
    ("ip", "inet", ["192.168.0.1/24", "::1", "10.0.0.1"]),
    ("cd", "cidr", ["10.0.0.0/8", "2001:db8::/32", "192.168.1.0/24"]),
    ("mac", "macaddr", ["08:00:2b:01:02:03", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"]),
    ("b4", "bit(4)", ["1010", "0000", "1111"]),
    ("vb", "varbit", ["101", "", "1"]),
    ("b4a", "bit(4)[]", ["{1010,NULL}", "{}", "{{0000},{1111}}"]),
    ("x", "xml", ['<a b="1">t</a>', "text only", "<r/><r/>"]),
    ("pt", "point", ["(1.5,-0)", "(0,0)", "(-1e+300,1e-300)"]),
]
# (column, source type, destination type only the destination has, values)
DEST_ONLY = [
    ("de", "text", "dst_mood", ["blue", "green", "red"]),
    ("se", "src_mood", "dst_mood", ["red", "green", "red"]),
    ("dd", "text", "email", ["a@b", "x@y.z", "@"]),
    ("dl", "text", "label[]", ["{a,b}", "{}", "{c,NULL}"]),
]
CITEXT = ("dc", "text", "citext", ["Abc", "", "ÄÖÜ"])

# representation-only changes (equal by '=' or with no '=' at all) at the same version: must be rewritten
REPRESENTATION_CHANGES = [
    (1, "num", "1.00"),
    (1, "jb", '{"a": 1.00}'),
    (1, "js", '{"b":1,"a":[1,2.50]}'),
    (1, "x", '<a  b="1">t</a>'),
    (1, "pt", "(1.5,0)"),
    (1, "an", "{1.00,1.0}"),
    (2, "iv", "24 hours"),
    (3, "f4", "0"),
    (3, "rn", "empty"),
    (2, "rn", "[0.0,)"),
    (3, "domjs", "1.5"),
    (3, "comp", "(sad,NaN)"),
    (1, "comp", "(happy,1.5)"),
]


def same_columns(conn) -> list:
    """SAME without xml on a server built without libxml (the PostgreSQL 18 wheel scripts/pg.sh may start):
    it has the type but refuses every value."""
    import psycopg2

    with conn.cursor() as cur:  # an autocommit connection (matrix_dbs): a failed probe leaves nothing behind
        try:
            cur.execute("SELECT '<a/>'::xml")
        except psycopg2.errors.FeatureNotSupported:
            return [s for s in SAME if s[1] != "xml"]
    return SAME


@pytest.fixture(scope="module")
def matrix_dbs(databases):
    import psycopg2

    src, dst = databases.create("tmsrc"), databases.create("tmdst")
    conns = {}
    for url in (src, dst):
        conns[url] = psycopg2.connect(url)
        conns[url].autocommit = True
    with conns[dst].cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'citext'")
        citext = cur.fetchone()[0] == 1
        if citext:
            cur.execute("CREATE EXTENSION citext")
    dest_only = DEST_ONLY + ([CITEXT] if citext else [])
    same = same_columns(conns[src])
    with conns[src].cursor() as cur:
        cur.execute(TYPES_BOTH + TYPES_SOURCE_ONLY)
        cur.execute(_table("matrix", [(c, t) for c, t, _ in same] + [(c, s) for c, s, _, _ in dest_only]))
        for row in (1, 2, 3):
            cols = [(c, t, v[row - 1]) for c, t, v in same] + [(c, s, v[row - 1]) for c, s, _, v in dest_only]
            cur.execute(
                sql.SQL("INSERT INTO matrix (id, at, updated_at, {cols}) VALUES (%s, %s, %s, {vals})").format(
                    cols=sql.SQL(", ").join(sql.Identifier(c) for c, _, _ in cols),
                    vals=sql.SQL(", ").join(sql.SQL("%s::{t}").format(t=sql.SQL(t)) for _, t, _ in cols),
                ),
                [row, f"2024-01-01 0{row}:00+00", "2024-01-01 00:00+00", *[v for _, _, v in cols]],
            )
        cur.execute("INSERT INTO matrix (id, at, updated_at) VALUES (4, '2024-01-01 04:00+00', '2024-01-01 00:00+00')")
    with conns[dst].cursor() as cur:
        cur.execute(TYPES_BOTH + TYPES_DEST_ONLY)
    yield src, dst, conns, [(c, d) for c, _, d, _ in dest_only], citext
    for c in conns.values():
        c.close()


def _table(name, cols):
    return sql.SQL(
        "CREATE TABLE {t} (id integer PRIMARY KEY, at timestamptz NOT NULL, updated_at timestamptz, {cols})"
    ).format(
        t=sql.Identifier(name),
        cols=sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in cols),
    )


def as_text(conn, table, columns):
    """Every row, every column as text, in key order: the exact content under one session's settings."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT {cols} FROM {t} ORDER BY id").format(
                cols=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns),
                t=sql.Identifier(table),
            )
        )
        return cur.fetchall()


def xmins(conn, table):
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT id, xmin::text FROM {} ORDER BY id").format(sql.Identifier(table)))
        return cur.fetchall()


CHUNK = Chunk("2024-01-01", pendulum.datetime(2024, 1, 1), pendulum.datetime(2024, 1, 2))


@pytest.mark.parametrize("versioned", [True, False], ids=["version_column", "backfill_wins"])
@pytest.mark.parametrize("copy_format", ["binary", "text"])
def test_every_type_round_trips_exactly_and_reruns_rewrite_nothing(matrix_dbs, copy_format, versioned):
    src, dst, conns, dest_only, _ = matrix_dbs
    target = f"m_{copy_format}_{int(versioned)}"
    same = same_columns(conns[src])
    columns = ["id", "at", "updated_at", *[c for c, _, _ in same], *[c for c, _ in dest_only]]
    with conns[src].cursor() as cur:  # a private copy of the seeded source: this test changes it
        cur.execute(
            sql.SQL("CREATE TABLE {t} (LIKE matrix INCLUDING ALL); INSERT INTO {t} SELECT * FROM matrix").format(
                t=sql.Identifier(target)
            )
        )
    with conns[dst].cursor() as cur:
        cur.execute(_table(target, [(c, t) for c, t, _ in same] + dest_only))
    versions = {"version_column": "updated_at"} if versioned else {"conflict_policy": "backfill_wins"}
    spec = table_spec(
        src, dst, target, time_column="at", destination_table=f"public.{target}", copy_format=copy_format, **versions
    )

    first = transfer_chunk(spec, CHUNK)
    assert (first.rows_extracted, first.inserted, first.updated) == (4, 4, 0)
    assert as_text(conns[dst], target, columns) == as_text(conns[src], target, columns)

    before = xmins(conns[dst], target)
    again = transfer_chunk(spec, CHUNK)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 4)
    assert xmins(conns[dst], target) == before  # no row version written

    # same version, a new representation only (equal by '=', or no '=' at all): that is a change to write
    with conns[src].cursor() as cur:
        for row, column, value in REPRESENTATION_CHANGES:
            if column not in {c for c, _, _ in same}:
                continue  # xml on a server without libxml (row 1 still changes through other columns)
            ctype = next(t for c, t, _ in same if c == column)
            cur.execute(
                sql.SQL("UPDATE {t} SET {c} = %s::{ty} WHERE id = %s").format(
                    t=sql.Identifier(target), c=sql.Identifier(column), ty=sql.SQL(ctype)
                ),
                (value, row),
            )
    changed = transfer_chunk(spec, CHUNK)
    assert (changed.inserted, changed.updated) == (0, 3)
    assert as_text(conns[dst], target, columns) == as_text(conns[src], target, columns)
    before = xmins(conns[dst], target)
    assert transfer_chunk(spec, CHUNK).updated == 0
    assert xmins(conns[dst], target) == before


def test_citext_loads_exactly_and_a_change_of_case_only_is_rewritten(matrix_dbs):
    """Source text into a destination citext: citext's '=' ignores case, the change test must not (a source that
    fixes a name's case at the same version would never reach the destination)."""
    src, dst, conns, dest_only, citext = matrix_dbs
    if not citext:
        pytest.skip("the citext extension is not installed on this PostgreSQL server (pg_available_extensions)")
    assert ("dc", "citext") in dest_only  # the round trip above carries the column too
    name, source_type, dest_type, values = CITEXT
    with conns[src].cursor() as cur:
        cur.execute(_table("ci", [(name, source_type)]))
        for row, value in enumerate([*values, None], start=1):
            cur.execute("INSERT INTO ci VALUES (%s, '2024-01-01 00:00+00', '2024-01-01 00:00+00', %s)", (row, value))
    with conns[dst].cursor() as cur:
        cur.execute(_table("ci", [(name, dest_type)]))
    spec = table_spec(src, dst, "ci", time_column="at", version_column="updated_at")
    columns = ["id", "at", "updated_at", name]

    first = transfer_chunk(spec, CHUNK)
    assert (first.inserted, first.updated) == (len(values) + 1, 0)
    assert as_text(conns[dst], "ci", columns) == as_text(conns[src], "ci", columns)
    before = xmins(conns[dst], "ci")
    assert transfer_chunk(spec, CHUNK).updated == 0 and xmins(conns[dst], "ci") == before

    with conns[src].cursor() as cur:  # the same version, the same value to citext's '=', another text
        cur.execute(sql.SQL("UPDATE ci SET {} = %s WHERE id = 1").format(sql.Identifier(name)), (values[0].swapcase(),))
    changed = transfer_chunk(spec, CHUNK)
    assert (changed.inserted, changed.updated) == (0, 1)
    assert as_text(conns[dst], "ci", columns) == as_text(conns[src], "ci", columns)


# ------------------------------------------------------------------------------------------------
# Property: the upsert's change test says "changed" exactly when the representation differs (the text
# of the value under one session), for types whose '=' is not identity or does not exist.
# ------------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_digits = st.integers(min_value=-(10**6), max_value=10**6)
_scale = st.integers(min_value=0, max_value=4)


def _numeric(n, s):
    sign = "-" if n < 0 else ""
    text = str(abs(n)).rjust(s + 1, "0")
    return f"{sign}{text[:-s]}.{text[-s:]}" if s else f"{sign}{text}"


def _more_zeros(v: str) -> str:
    """The same number written with one more trailing zero (1.5 -> 1.50, 2 -> 2.0)."""
    return v if not v.lstrip("-").replace(".", "").isdigit() else (v + "0" if "." in v else v + ".0")


def _float(width):
    return st.one_of(
        st.floats(allow_nan=False, width=width).map(repr).map(lambda r: r.replace("inf", "Infinity")),
        st.sampled_from(["NaN", "-0", "0", "Infinity", "-Infinity"]),
    )


NUM = st.builds(_numeric, _digits, _scale)
NUMERIC = st.one_of(NUM, st.sampled_from(["NaN", "Infinity", "-Infinity", "0", "-0.0"]))
FLOAT = _float(64)
# (values, an equal value written differently: '=' says equal, the representation differs)
PROPERTY_TYPES = {
    "numeric": (NUMERIC, _more_zeros),
    "double precision": (FLOAT, lambda v: {"0": "-0", "-0": "0", "0.0": "-0.0", "-0.0": "0.0"}.get(v, v)),
    "real": (_float(32), lambda v: {"0": "-0", "-0": "0", "0.0": "-0.0", "-0.0": "0.0"}.get(v, v)),
    "interval": (
        st.builds(lambda d, h: f"{d} days {h} hours", st.integers(-40, 40), st.integers(-48, 48)),
        lambda v: f"{24 * int(v.split()[0]) + int(v.split()[2])} hours",
    ),
    "jsonb": (NUM.map(lambda n: f'{{"a": {n}}}'), lambda v: f'{{"a": {_more_zeros(v[6:-1])}}}'),
    "json": (NUM.map(lambda n: f'{{"a": {n}}}'), lambda v: f'{{"a":{v[6:-1]}}}'),
    "numeric[]": (
        st.lists(NUMERIC.filter(lambda v: "Inf" not in v), max_size=3).map(lambda xs: "{" + ",".join(xs) + "}"),
        lambda v: "{" + ",".join(_more_zeros(x) for x in v[1:-1].split(",") if x) + "}",
    ),
    "numrange": (
        st.tuples(NUM, NUM).map(lambda p: f"[{min(p, key=float)},{max(p, key=float)})"),
        lambda v: "[" + ",".join(_more_zeros(x) for x in v[1:-1].split(",")) + ")",
    ),
    "point": (st.tuples(FLOAT, FLOAT).map(lambda p: f"({p[0]},{p[1]})"), lambda v: v.replace("(0,", "(-0,")),
}
CITEXT_CASE = (st.sampled_from(["abc", "ABC", "Abc", "äbc", "ÄBC", ""]), str.swapcase)


@pytest.fixture(scope="module")
def probe(matrix_dbs):
    from airflow_backfill_provider.prepare import catalog as schema
    from airflow_backfill_provider.core.spec import TableName

    _, dst, conns, _, citext = matrix_dbs
    types = dict(PROPERTY_TYPES)
    if citext:
        types["citext"] = CITEXT_CASE
    names = {t: f"p{i}" for i, t in enumerate(types)}
    conn = conns[dst]
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE change_probe ({})").format(
                sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(names[t]), sql.SQL(t)) for t in types)
            )
        )
    infos = schema.describe_types(conn, TableName(name="change_probe"))
    return conn, types, names, infos


@pytest.mark.parametrize("type_sql", [*PROPERTY_TYPES, "citext"])
def test_change_test_is_exactly_a_change_of_representation(probe, type_sql):
    from airflow_backfill_provider.prepare import casts

    conn, types, names, infos = probe
    if type_sql not in types:
        pytest.skip("the citext extension is not installed on this PostgreSQL server (pg_available_extensions)")
    col = names[type_sql]
    query = sql.SQL(
        "SELECT {test}, t.{c}::text IS DISTINCT FROM excluded.{c}::text, t.{c}::text, excluded.{c}::text"
        " FROM (SELECT %s::{ty} AS {c}) t, (SELECT %s::{ty} AS {c}) excluded"
    ).format(test=casts.change_test(col, infos[col]), c=sql.Identifier(col), ty=sql.SQL(type_sql))

    values, variant = types[type_sql]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(a=values, b=values, mode=st.sampled_from(["same", "other", "equal_but_written_differently"]))
    def check(a, b, mode):
        b = {"same": a, "other": b}.get(mode) or variant(a)
        with conn.cursor() as cur:
            cur.execute(query, (a, b))
            changed, oracle, left, right = cur.fetchone()
        assert changed == oracle, (left, right)

    check()
