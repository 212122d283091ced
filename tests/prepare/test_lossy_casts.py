"""A cast from the source type to the destination type never changes a value silently.

Matrix of (source type, destination type, value): a value the cast would cut, pad or round fails the
chunk with an error naming the column, and nothing is written (no row, no ledger entry); a value the
cast keeps loads exactly; ``allow_lossy_casts`` accepts rounding for the listed columns (never a cut).
Each case has its own small table pair in one module-wide source and destination database.
"""

from __future__ import annotations

import itertools

import pendulum
import pytest
from psycopg2 import sql

from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.core.exceptions import PermanentChunkError, SpecError
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.specs import table_spec

BOTH = "CREATE DOMAIN vc5 AS varchar(5); CREATE DOMAIN money2 AS numeric(12,2);"
DEST_ONLY = """
CREATE DOMAIN dvc5 AS varchar(5); CREATE DOMAIN dnum2 AS numeric(12,2) CHECK (VALUE >= 0);
CREATE TYPE dmood AS ENUM ('happy', 'sad'); CREATE DOMAIN demail AS text CHECK (VALUE LIKE '%@%');
CREATE DOMAIN dmood5 AS dmood;
"""

REFUSED, KEPT = "refused", "kept"
# (source type, destination type, source value, expectation, destination text when kept)
CASES = [
    ("text[]", "varchar(5)[]", "{abcdefg}", REFUSED, None),
    ("text[]", "varchar(5)[]", "{abcde,NULL}", KEPT, "{abcde,NULL}"),
    ("varbit", "bit(4)", "101", REFUSED, None),
    ("varbit", "bit(4)", "10100", REFUSED, None),
    ("varbit", "bit(4)", "1010", KEPT, "1010"),
    ("varbit[]", "bit(4)[]", "{101}", REFUSED, None),
    ("varbit[]", "bit(4)[]", "{1010,NULL}", KEPT, "{1010,NULL}"),
    ("text[]", "char(2)[]", "{abc}", REFUSED, None),
    ("text", "vc5", "abcdefg", REFUSED, None),
    ("text", "dvc5", "abcdefg", REFUSED, None),  # a domain only the destination has
    ("text", "dvc5", "abc", KEPT, "abc"),
    ("text", "char(3)", "abcd", REFUSED, None),
    # types only the destination has: cast there; a value it rejects is named like any other
    ("text", "dmood", "purple", REFUSED, None),
    ("text", "dmood", "happy", KEPT, "happy"),
    ("text", "dmood5", "purple", REFUSED, None),
    ("text", "demail", "nope", REFUSED, None),
    ("text", "demail", "a@b", KEPT, "a@b"),
    ("text[]", "dmood[]", "{happy,purple}", REFUSED, None),
    ("text[]", "dvc5[]", "{abcdefg}", REFUSED, None),
    ("text[]", "dvc5[]", "{abc,NULL}", KEPT, "{abc,NULL}"),
    ("numeric(12,4)", "dnum2", "-1.5000", REFUSED, None),
    ("numeric(12,4)", "numeric(12,2)", "1.2345", REFUSED, None),
    ("numeric(12,4)", "numeric(12,2)", "1.2300", KEPT, "1.23"),
    ("numeric(12,4)", "money2", "1.2345", REFUSED, None),
    ("numeric(12,4)", "dnum2", "1.2345", REFUSED, None),
    ("numeric(12,4)", "dnum2", "1.5000", KEPT, "1.50"),
    ("numeric(12,4)[]", "numeric(12,2)[]", "{1.2345}", REFUSED, None),
    ("numeric", "integer", "1.5", REFUSED, None),
    ("numeric", "integer", "2.0", KEPT, "2"),
    ("numeric", "integer", "NaN", REFUSED, None),
    ("double precision", "integer", "2.5", REFUSED, None),
    ("double precision", "real", "0.1", REFUSED, None),
    ("double precision", "real", "0.5", KEPT, "0.5"),
    ("double precision", "real", "NaN", KEPT, "NaN"),
    ("double precision", "numeric(6,2)", "0.125", REFUSED, None),
    ("integer", "real", "16777217", REFUSED, None),
    ("bigint", "double precision", "9007199254740993", REFUSED, None),
    ("bigint", "integer", "1099511627776", REFUSED, None),
    ("bigint", "integer", "7", KEPT, "7"),
    ("timestamp(6)", "timestamp(0)", "2024-01-01 10:00:00.5", REFUSED, None),
    ("timestamp(6)", "timestamp(0)", "2024-01-01 10:00:00", KEPT, "2024-01-01 10:00:00"),
    ("timestamptz", "date", "2024-01-01 10:00+00", REFUSED, None),
    ("timestamp", "date", "2024-01-01 00:00", KEPT, "2024-01-01"),
    ("time(6)", "time(0)", "10:00:00.25", REFUSED, None),
    ("interval", "interval(0)", "1.5 seconds", REFUSED, None),
    ("text", "numeric(12,2)", "1.234", REFUSED, None),
    ("text", "numeric(12,2)", "1.5", KEPT, "1.50"),
    ("text", "timestamp(0)", "2024-01-01 10:00:00.5", REFUSED, None),
    ("numeric", "money", "0.125", REFUSED, None),
    ("integer", "bigint", "2147483647", KEPT, "2147483647"),
    ("real", "double precision", "0.1", KEPT, "0.10000000149011612"),
    ("date", "timestamp", "2024-02-29", KEPT, "2024-02-29 00:00:00"),
]


@pytest.fixture(scope="module")
def lossy_dbs(databases):
    import psycopg2

    src, dst = databases.create("lcsrc"), databases.create("lcdst")
    conns = {url: psycopg2.connect(url) for url in (src, dst)}
    for c in conns.values():
        c.autocommit = True
    with conns[src].cursor() as cur:
        cur.execute(BOTH)
    with conns[dst].cursor() as cur:
        cur.execute(BOTH + DEST_ONLY)
    yield src, dst, conns
    for c in conns.values():
        c.close()


_names = itertools.count()
CHUNK = Chunk("2024-01-01", pendulum.datetime(2024, 1, 1), pendulum.datetime(2024, 1, 2))


def make_case(lossy_dbs, src_type, dst_type, value, **spec_extra):
    src, dst, conns = lossy_dbs
    table = f"lossy_case_{next(_names)}_t"
    ddl = "CREATE TABLE {t} (id integer PRIMARY KEY, at timestamptz NOT NULL, c {ty})"
    with conns[src].cursor() as cur:
        cur.execute(sql.SQL(ddl).format(t=sql.Identifier(table), ty=sql.SQL(src_type)))
        cur.execute(
            sql.SQL(
                "INSERT INTO {t} VALUES (1, '2024-01-01 06:00+00', %s::{ty}), (2, '2024-01-01 07:00+00', NULL)"
            ).format(t=sql.Identifier(table), ty=sql.SQL(src_type)),
            (value,),
        )
    with conns[dst].cursor() as cur:
        cur.execute(sql.SQL(ddl).format(t=sql.Identifier(table), ty=sql.SQL(dst_type)))
    spec = table_spec(src, dst, table, time_column="at", name="lossy", conflict_policy="backfill_wins", **spec_extra)
    return spec, table


def loaded(conn, table):
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT id, c::text FROM {} ORDER BY id").format(sql.Identifier(table)))
        rows = cur.fetchall()
        cur.execute("SELECT to_regclass('public.backfill_ledger') IS NOT NULL")
        ledger = []
        if cur.fetchone()[0]:
            # matched on the whole row's text: robust to how the ledger identifies a backfill
            cur.execute("SELECT chunk_id FROM public.backfill_ledger l WHERE l::text LIKE %s", (f"%{table}%",))
            ledger = cur.fetchall()
        return rows, ledger


@pytest.mark.parametrize("copy_format", ["binary", "text"])
@pytest.mark.parametrize("src_type,dst_type,value,expect,kept", CASES, ids=[f"{a}->{b}:{v}" for a, b, v, *_ in CASES])
def test_a_cast_never_changes_a_value_silently(lossy_dbs, src_type, dst_type, value, expect, kept, copy_format):
    spec, table = make_case(lossy_dbs, src_type, dst_type, value, copy_format=copy_format)
    conn = lossy_dbs[2][lossy_dbs[1]]
    if expect == REFUSED:
        with pytest.raises(PermanentChunkError) as err:
            transfer_chunk(spec, CHUNK)
        assert "column 'c'" in str(err.value), str(err.value)
        assert loaded(conn, table) == ([], [])  # nothing written: no row, no ledger entry
    else:
        result = transfer_chunk(spec, CHUNK)
        assert result.inserted == 2
        assert loaded(conn, table)[0] == [(1, kept), (2, None)]
        assert transfer_chunk(spec, CHUNK).updated == 0


def test_the_refusal_names_both_types_the_key_the_values_and_the_fixes(lossy_dbs):
    spec, _ = make_case(lossy_dbs, "numeric(12,4)", "numeric(12,2)", "1.2345")
    with pytest.raises(PermanentChunkError) as err:
        transfer_chunk(spec, CHUNK)
    assert str(err.value) == (
        "chunk 2024-01-01: column 'c': casting source type numeric(12,4) to destination type numeric(12,2) "
        "would change value '1.2345' to '1.23' at key (id)=(1). Nothing was loaded for this chunk; widen the "
        "destination column, map the value explicitly with a historical.column_expressions entry (e.g. "
        "round(...)), or accept the rounding with allow_lossy_casts: [c] in the spec"
    )


@pytest.mark.parametrize("allow", [True, ["c"]], ids=["all", "listed"])
def test_allow_lossy_casts_accepts_rounding_but_never_a_cut(lossy_dbs, allow):
    spec, table = make_case(lossy_dbs, "numeric(12,4)", "numeric(12,2)", "1.2345", allow_lossy_casts=allow)
    conn = lossy_dbs[2][lossy_dbs[1]]
    result = transfer_chunk(spec, CHUNK)
    assert "rounding allowed by allow_lossy_casts" in " ".join(result.decisions)
    assert loaded(conn, table)[0] == [(1, "1.23"), (2, None)]
    assert transfer_chunk(spec, CHUNK).updated == 0
    spec, table = make_case(lossy_dbs, "text", "varchar(5)", "abcdefg", allow_lossy_casts=allow)
    with pytest.raises(PermanentChunkError, match="column 'c'"):
        transfer_chunk(spec, CHUNK)


def test_allow_lossy_casts_is_validated(lossy_dbs):
    for bad in ("c", [], ["c", "c"], [""]):
        with pytest.raises(SpecError, match=r"allow_lossy_casts"):
            make_case(lossy_dbs, "integer", "integer", "1", allow_lossy_casts=bad)
    spec, table = make_case(lossy_dbs, "numeric(12,4)", "numeric(12,2)", "1.2345", allow_lossy_casts=["amount"])
    with pytest.raises(PermanentChunkError, match=r"allow_lossy_casts lists \['amount'\].*loaded: \['id', 'at', 'c'\]"):
        transfer_chunk(spec, CHUNK)
    assert loaded(lossy_dbs[2][lossy_dbs[1]], table) == ([], [])


# ------------------------------------------------------------------------------------------------
# The "cannot lose information" table (casts.lossless) against the server itself: every pair it calls
# lossless either keeps each sample value exactly (cast there and back) or raises. Pairs it does not
# call lossless are checked value by value in the chunk path (the matrix above).
# ------------------------------------------------------------------------------------------------
SAMPLES = {
    "smallint": ["0", "-32768", "32767"],
    "integer": ["0", "-2147483648", "2147483647", "16777217"],
    "bigint": ["0", "9007199254740993", "-9223372036854775808"],
    "numeric": ["1.5", "1e20", "NaN", "0.000000000000000000001", "Infinity"],
    "numeric(12,4)": ["1.2345", "-99999999.9999", "NaN"],
    "numeric(12,2)": ["1.25", "NaN"],
    "numeric(6,2)": ["9999.99"],
    "real": ["0.1", "NaN", "-0", "Infinity", "16777217", "3.4028235e38"],
    "double precision": ["0.1", "NaN", "-0", "-Infinity", "1e300", "9007199254740993"],
    "date": ["2024-02-29", "infinity", "4713-01-01 BC"],
    "timestamp": ["2024-01-01 10:00:00.123456", "infinity"],
    "timestamp(0)": ["2024-01-01 10:00:01"],
    "timestamptz": ["2024-01-01 10:00:00.5+00", "-infinity"],
    "time": ["10:00:00.25", "24:00"],
    "time(0)": ["10:00:01"],
    "interval": ["1.5 seconds", "1 mon -2 days"],
    "bit(4)": ["1010"],
    "varbit": ["101", ""],
    "money": ["12.34", "-0.01"],
    "boolean": ["true"],
    "json": ['{"a": 1}'],
    "jsonb": ['{"a": 1.0}'],
    "inet": ["10.0.0.1/8"],
    "cidr": ["10.0.0.0/8"],
}
TARGETS = [*SAMPLES, "text", "varchar(5)"]


def test_every_pair_called_lossless_keeps_values_or_raises(lossy_dbs):
    from airflow_backfill_provider.prepare import casts, catalog as schema
    from airflow_backfill_provider.core.spec import TableName

    _, dst, conns = lossy_dbs
    conn = conns[dst]
    names = {t: f"t{i}" for i, t in enumerate(TARGETS)}
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE type_probe ({})").format(
                sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(names[t]), sql.SQL(t)) for t in TARGETS)
            )
        )
    info = {t: schema.describe_types(conn, TableName(name="type_probe"))[names[t]] for t in TARGETS}
    violations, checked = [], 0
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        for s_type, values in SAMPLES.items():
            for t_type in TARGETS:
                if s_type == t_type or not casts.lossless(info[s_type], info[t_type]):
                    continue
                for v in values:
                    cur.execute("SAVEPOINT p")
                    try:
                        # as the chunk path does it: cast to T without a length, assign into a T column
                        cur.execute(
                            sql.SQL(
                                "INSERT INTO type_probe ({c}) SELECT (%s::{s})::{u} RETURNING (({c})::{s})::text, (%s::{s})::text"
                            ).format(
                                c=sql.Identifier(names[t_type]),
                                s=sql.SQL(s_type),
                                u=sql.SQL(casts.unbounded(info[t_type])),
                            ),
                            (v, v),
                        )
                        back, original = cur.fetchone()
                        cur.execute("ROLLBACK TO SAVEPOINT p")
                        checked += 1
                        if back != original:
                            violations.append(f"{s_type} -> {t_type}: {original!r} came back as {back!r}")
                    except Exception:  # noqa: BLE001 - raising is the allowed outcome (overflow, length)
                        cur.execute("ROLLBACK TO SAVEPOINT p")
        cur.execute("ROLLBACK")
    assert checked > 50
    assert violations == []


def test_live_ingest_refuses_a_rounding_cast_and_keeps_its_watermark(lossy_dbs):
    from airflow_backfill_provider.live import run_live_ingest

    spec, table = make_case(lossy_dbs, "numeric(12,4)", "numeric(12,2)", "1.2345")
    spec = load_spec(
        {**spec.model_dump(by_alias=True, exclude={"live"}), "live": {"enabled": True, "start_from": "2020-01-01"}}
    )
    with pytest.raises(
        PermanentChunkError,
        match=r"live run of (public\.)?lossy_case_\d+_t: column 'c': casting source type numeric\(12,4\)",
    ):
        run_live_ingest(spec)
    conn = lossy_dbs[2][lossy_dbs[1]]
    assert loaded(conn, table)[0] == []
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM public.backfill_watermarks w WHERE w::text LIKE %s", (f"%{table}%",))
        assert cur.fetchone()[0] == 0


def test_live_ingest_names_a_value_a_destination_only_type_rejects(lossy_dbs):
    from airflow_backfill_provider.live import run_live_ingest

    spec, table = make_case(lossy_dbs, "text", "dmood", "purple")
    spec = load_spec(
        {**spec.model_dump(by_alias=True, exclude={"live"}), "live": {"enabled": True, "start_from": "2020-01-01"}}
    )
    with pytest.raises(PermanentChunkError) as err:
        run_live_ingest(spec)
    assert "column 'c' cannot take value 'purple'" in str(err.value) and "at key (id)=(1)" in str(err.value)
    assert loaded(lossy_dbs[2][lossy_dbs[1]], table)[0] == []
