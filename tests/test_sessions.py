"""Every session pins the settings that change results, whatever the server or database defaults are.

Real PostgreSQL; each test's databases get hostile defaults with ``ALTER DATABASE .. SET`` (TimeZone
America/New_York, DateStyle 'SQL, DMY', IntervalStyle sql_standard, extra_float_digits 0) or another
encoding (LATIN1, SQL_ASCII), the way a real server's configuration would.
"""

from __future__ import annotations

import datetime as dt
import json

import psycopg2
import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.connections import connect, timeout_ms
from airflow_backfill_provider.core.exceptions import PermanentChunkError, SpecError
from airflow_backfill_provider.live import run_live_ingest
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.session_helpers import HOSTILE, create_database, dbname, run_sql, server_address, set_database_defaults
from tests import specs

UTC = dt.timezone.utc


def make_spec(src, dst, table="ev", time_column="t", **extra):
    return specs.table_spec(src, dst, table, time_column=time_column, **extra)


def show(conn, *names):
    with conn.cursor() as cur:
        out = []
        for n in names:
            cur.execute(psycopg2.sql.SQL("SHOW {}").format(psycopg2.sql.Identifier(n)))
            out.append(cur.fetchone()[0])
    conn.rollback()
    return out


def show_under_timeout(conn, *names, attempts: int = 50):
    """SHOW on a session whose statement_timeout is ~1 ms: on a loaded machine SHOW itself can be cancelled
    (reported as "user request" when the timer fires as the statement ends), so retry a bounded number of times."""
    for _ in range(attempts - 1):
        try:
            return show(conn, *names)
        except psycopg2.errors.QueryCanceled:
            conn.rollback()
    return show(conn, *names)


def ledger_rows(url):
    if not run_sql(url, "SELECT to_regclass('public.backfill_ledger')")[0][0]:
        return []
    return run_sql(url, "SELECT chunk_id FROM backfill_ledger ORDER BY chunk_id")


# --- the pinned settings themselves ----------------------------------------------------------------


@pytest.mark.parametrize("timezone", ["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"])
def test_session_settings_are_pinned_against_database_defaults(src_url, timezone):
    set_database_defaults(src_url, **{**HOSTILE, "timezone": "Pacific/Auckland", "client_encoding": "LATIN1"})
    assert run_sql(src_url, "SHOW TimeZone")[0][0] == "Pacific/Auckland"  # the hostile default is real
    conn = connect(src_url, application_name="t", timezone=timezone, readonly=True, statement_timeout_s=30)
    try:
        assert show(conn, "TimeZone", "DateStyle", "IntervalStyle", "extra_float_digits", "client_encoding") == [
            timezone,
            "ISO, MDY",
            "postgres",
            "3",
            "UTF8",
        ]
        assert show(conn, "default_transaction_read_only", "statement_timeout") == ["on", "30s"]
    finally:
        conn.close()


def test_user_options_are_kept_and_ours_appended(src_url):
    set_database_defaults(src_url, timezone="America/New_York")
    url = f"{src_url}?options=-c%20search_path%3Dmyschema%20-c%20TimeZone%3DAsia/Tokyo"
    conn = connect(url, application_name="t", timezone="UTC")
    try:
        # the user's search_path stays; a TimeZone the user set loses to the spec's (it decides meaning)
        assert show(conn, "search_path", "TimeZone") == ["myschema", "UTC"]
    finally:
        conn.close()


@pytest.mark.parametrize(
    "seconds, expected",
    [(0.0001, "1ms"), (0.0004, "1ms"), (0.0009, "1ms"), (0.001, "1ms"), (0.0015, "2ms"), (2.5, "2500ms"), (30, "30s")],
)
def test_sub_millisecond_timeouts_round_up_never_to_no_timeout(src_url, seconds, expected):
    assert timeout_ms(seconds) >= 1
    conn = connect(src_url, application_name="t", statement_timeout_s=seconds, lock_timeout_s=seconds)
    try:
        assert show_under_timeout(conn, "statement_timeout", "lock_timeout") == [expected, expected]
        if seconds < 0.01:  # and it is enforced: 0 would have let this run
            with pytest.raises(psycopg2.errors.QueryCanceled), conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(0.2)")
    finally:
        conn.close()


# --- time: naive timestamps, drift casts, live ingest ---------------------------------------------


@pytest.mark.parametrize("spec_tz", ["UTC", "Asia/Kolkata", "America/New_York"])
def test_naive_timestamp_day_chunk_loads_every_row_whatever_the_server_timezone(src_url, dst_url, spec_tz):
    for url in (src_url, dst_url):
        set_database_defaults(url, **HOSTILE)
        run_sql(url, "CREATE TABLE ev (id int PRIMARY KEY, t timestamp NOT NULL)")
    # naive values are wall times in the spec's timezone: the day chunk holds exactly its 24 hours
    day = [dt.datetime(2024, 1, 1, h, 30) for h in range(24)]
    outside = [dt.datetime(2023, 12, 31, 23, 59, 59), dt.datetime(2024, 1, 2, 0, 0)]
    rows = list(enumerate(day + outside, start=1))
    run_sql(
        src_url,
        "INSERT INTO ev SELECT * FROM unnest(%s::int[], %s::timestamp[])",
        ([i for i, _ in rows], [t for _, t in rows]),
    )
    chunk = plan_chunks("2024-01-01", "2024-01-02", "day", spec_tz)[0]
    result = transfer_chunk(make_spec(src_url, dst_url, timezone=spec_tz), chunk)
    assert result.rows_extracted == 24
    assert [r[0] for r in run_sql(dst_url, "SELECT t FROM ev ORDER BY t")] == day


@pytest.mark.parametrize(
    "spec_tz, wall",
    [
        ("UTC", dt.datetime(2024, 1, 1, 12)),
        ("Asia/Kolkata", dt.datetime(2024, 1, 1, 17, 30)),
        ("America/Santiago", dt.datetime(2024, 1, 1, 9)),
    ],
)
def test_timestamptz_to_timestamp_drift_gives_wall_time_in_spec_timezone(src_url, dst_url, spec_tz, wall):
    for url in (src_url, dst_url):
        set_database_defaults(url, **HOSTILE)
    run_sql(src_url, "CREATE TABLE ev (id int PRIMARY KEY, t timestamptz NOT NULL, seen timestamptz)")
    run_sql(dst_url, "CREATE TABLE ev (id int PRIMARY KEY, t timestamptz NOT NULL, seen timestamp)")
    run_sql(src_url, "INSERT INTO ev VALUES (1, '2024-01-01 12:00+00', '2024-01-01 12:00+00')")
    chunk = plan_chunks("2023-12-31", "2024-01-03", "week", spec_tz)
    spec = make_spec(src_url, dst_url, timezone=spec_tz)
    assert sum(transfer_chunk(spec, c).rows_extracted for c in chunk) == 1
    assert run_sql(dst_url, "SELECT seen FROM ev")[0][0] == wall


def test_live_ingest_with_destination_in_another_timezone_loses_no_row(src_url, dst_url):
    set_database_defaults(src_url, timezone="UTC")
    set_database_defaults(dst_url, **HOSTILE)  # destination sessions default to America/New_York
    for url in (src_url, dst_url):
        run_sql(url, "CREATE TABLE ev (id int PRIMARY KEY, t timestamp NOT NULL, updated_at timestamp NOT NULL)")
    spec = make_spec(
        src_url, dst_url, version_column="updated_at", live={"lookback_s": 0, "start_from": "2024-01-01T00:00:00+00:00"}
    )
    run_sql(src_url, "INSERT INTO ev VALUES (1, '2024-01-01 10:00', '2024-01-01 10:00')")
    run_live_ingest(spec)
    # committed after the first run, stamped an hour after its watermark: the next run must take it
    run_sql(src_url, "INSERT INTO ev VALUES (2, '2024-01-01 11:00', '2024-01-01 11:00')")
    run_live_ingest(spec)
    run_sql(src_url, "INSERT INTO ev VALUES (3, '2024-01-01 16:00', '2024-01-01 16:00')")
    run_live_ingest(spec)
    assert run_sql(dst_url, "SELECT id FROM ev ORDER BY id") == [(1,), (2,), (3,)]
    wm = run_sql(dst_url, "SELECT watermark FROM backfill_watermarks", setup="SET TimeZone = 'UTC'")[0][0]
    assert wm == dt.datetime(2024, 1, 1, 16, tzinfo=UTC)  # naive cursor values mean spec timezone (UTC)


# --- text format: values survive the source's output settings ---------------------------------------

_VALUES = """
    (1, '2024-01-01 01:00+00', 0.1::float8 + 0.2::float8, 0.1::float4 * 3, interval '-1 day +2 hours',
        date '2024-02-01', timestamp '2024-01-02 03:04:05.123456', '1e-310'::float8),
    (2, '2024-01-01 02:00+00', 1/3::float8, 'NaN', interval '1 day -02:00:00', date '2024-12-03',
        timestamp '1999-12-31 23:59:59.999999', '-0'::float8),
    (3, '2024-01-01 03:00+00', 'Infinity', '-Infinity', interval '-1 year +2 mons -3 days +04:05:06.5',
        date '0044-03-15 BC', timestamp 'infinity', 2.2250738585072014e-308::float8),
    (4, '2024-01-01 04:00+00', 123456789.12345678, 3.4e38, interval '-3 days -04:05:06.5',
        date 'infinity', timestamp '2024-02-29 12:00', 1e308::float8)
"""
_DDL = (
    "CREATE TABLE ev (id int PRIMARY KEY, t timestamptz NOT NULL, f8 float8, f4 float4, iv interval, "
    "d date, ts timestamp, tiny float8)"
)
_CANONICAL = (
    "SELECT id, float8send(f8), float4send(f4), iv::text, extract(epoch FROM iv), d::text, ts::text, "
    "float8send(tiny) FROM ev ORDER BY id"
)
_PINNED = "SET extra_float_digits = 3; SET IntervalStyle = postgres; SET DateStyle = 'ISO, MDY'; SET TimeZone = 'UTC'"


@pytest.mark.parametrize("copy_format", ["text", "binary"])
def test_values_are_exact_whatever_the_source_output_settings(src_url, dst_url, copy_format):
    set_database_defaults(src_url, **HOSTILE)
    set_database_defaults(dst_url, timezone="Asia/Kolkata")
    for url in (src_url, dst_url):
        run_sql(url, _DDL)
    run_sql(src_url, f"INSERT INTO ev VALUES {_VALUES}")
    chunk = plan_chunks("2024-01-01", "2024-01-02", "day", "UTC")[0]
    assert transfer_chunk(make_spec(src_url, dst_url, copy_format=copy_format), chunk).rows_extracted == 4
    src_rows = [
        tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
        for r in run_sql(src_url, _CANONICAL, setup=_PINNED)
    ]
    dst_rows = [
        tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
        for r in run_sql(dst_url, _CANONICAL, setup=_PINNED)
    ]
    assert dst_rows == src_rows
    # and a rerun finds every row unchanged (no value drifted on the way)
    again = transfer_chunk(make_spec(src_url, dst_url, copy_format=copy_format), chunk)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 4)


# --- encodings ------------------------------------------------------------------------------------

_TEXT_DDL = "CREATE TABLE ev (id int PRIMARY KEY, t timestamptz NOT NULL, note text, tags text[])"


def _latin1_read(url):
    """Read back through the database's own encoding (LATIN1): mojibake would show as 'cafÃ©'."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, note, tags FROM ev ORDER BY id")
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("copy_format", ["binary", "text"])
def test_utf8_to_latin1_is_exact_or_fails_naming_column_and_key(databases, src_url, copy_format):
    dst_url = create_database(databases, "latin1", "LATIN1")
    set_database_defaults(dst_url, client_encoding="LATIN1")
    assert run_sql(dst_url, "SHOW server_encoding")[0][0] == "LATIN1"
    run_sql(src_url, _TEXT_DDL)
    run_sql(dst_url, _TEXT_DDL)
    good = [(1, "café", ["naïve", "Ñandú"]), (2, "½ × ¿? ÿ", None), (3, None, ["ß"])]
    for i, note, tags in good:
        run_sql(src_url, "INSERT INTO ev VALUES (%s, '2024-01-01 10:00+00', %s, %s)", (i, note, tags))
    for i, note in [(10, "ok"), (11, "price: 5 €"), (12, "日本")]:
        run_sql(src_url, "INSERT INTO ev VALUES (%s, '2024-01-02 10:00+00', %s, NULL)", (i, note))
    day1, day2 = plan_chunks("2024-01-01", "2024-01-03", "day", "UTC")
    spec = make_spec(src_url, dst_url, copy_format=copy_format)
    assert transfer_chunk(spec, day1).rows_extracted == 3
    assert _latin1_read(dst_url) == [(i, n, t) for i, n, t in good]
    with pytest.raises(PermanentChunkError) as info:
        transfer_chunk(spec, day2)
    msg = str(info.value)
    assert "column 'note'" in msg and "id='11'" in msg and "'€'" in msg and "LATIN1" in msg, msg
    assert _latin1_read(dst_url) == [(i, n, t) for i, n, t in good]  # nothing of day 2 was written
    assert ledger_rows(dst_url) == [(day1.chunk_id,)]


def test_sql_ascii_source_loads_valid_utf8_bytes_exactly_and_refuses_others(databases, dst_url):
    src_url = create_database(databases, "sqlascii", "SQL_ASCII")
    run_sql(src_url, _TEXT_DDL)
    run_sql(dst_url, _TEXT_DDL)
    conn = psycopg2.connect(src_url)
    conn.set_client_encoding("UTF8")  # SQL_ASCII stores whatever bytes arrive: here UTF-8 ones
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO ev VALUES (1, '2024-01-01 10:00+00', 'café', '{Ñandú}')")
        cur.execute("INSERT INTO ev VALUES (2, '2024-01-02 10:00+00', 'plain', NULL)")
        cur.execute("INSERT INTO ev VALUES (3, '2024-01-02 11:00+00', E'caf\\xe9 latin1', NULL)")
    conn.close()
    day1, day2 = plan_chunks("2024-01-01", "2024-01-03", "day", "UTC")
    spec = make_spec(src_url, dst_url)
    assert transfer_chunk(spec, day1).rows_extracted == 1
    assert run_sql(dst_url, "SELECT note, tags FROM ev") == [("café", ["Ñandú"])]
    with pytest.raises(PermanentChunkError) as info:
        transfer_chunk(spec, day2)
    msg = str(info.value)
    assert "column 'note'" in msg and "id='3'" in msg and "not valid UTF-8" in msg, msg
    assert run_sql(dst_url, "SELECT count(*) FROM ev") == [(1,)]


# --- conn ids: never a password in the DAG ----------------------------------------------------------

_SECRET_DSNS = [
    "postgresql://u:s3cret@db.example:5432/app",
    "postgres://u:s3cret@db.example/app?sslmode=require",
    "postgresql://u@db.example/app?password=s3cret",
    "host=db.example dbname=app password=s3cret",
]


@pytest.mark.parametrize("key", ["source_conn_id", "destination_conn_id"])
@pytest.mark.parametrize("dsn", _SECRET_DSNS)
def test_spec_refuses_a_conn_id_with_a_password(key, dsn):
    ids = {"source_conn_id": "src_pg", "destination_conn_id": "dst_pg", key: dsn}
    with pytest.raises(SpecError) as info:
        specs.make_spec(**ids)
    msg = str(info.value)
    assert key in msg and "password" in msg and "AIRFLOW_CONN_" in msg and "s3cret" not in msg, msg


@pytest.mark.parametrize("dsn", ["postgresql://u@db.example:5432/app", "host=db.example dbname=app user=u", "prod_pg"])
def test_spec_accepts_conn_ids_and_dsns_without_password(dsn):
    spec = specs.make_spec(dsn, dsn)
    assert spec.source_conn_id == dsn


# --- Airflow connections through PostgresHook's own resolution ------------------------------------------


def _airflow_conn(monkeypatch, conn_id, **fields):
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "postgres", **fields}))


def test_airflow_connection_extras_are_honoured(monkeypatch, src_url, dst_url):
    """options (search_path), sslmode, hostaddr (not in any whitelist), cursor: as PostgresHook reads them."""
    run_sql(src_url, "CREATE SCHEMA myschema")
    run_sql(src_url, "CREATE TABLE public.ev (id int PRIMARY KEY, t timestamptz NOT NULL)")  # the wrong one
    run_sql(src_url, "CREATE TABLE myschema.ev (id int PRIMARY KEY, t timestamptz NOT NULL)")
    run_sql(
        src_url,
        "INSERT INTO myschema.ev SELECT g, '2024-01-01'::timestamptz + g * interval '1 min' "
        "FROM generate_series(1, 50) g",
    )
    run_sql(dst_url, "CREATE TABLE ev (id int PRIMARY KEY, t timestamptz NOT NULL)")
    _airflow_conn(
        monkeypatch,
        "bf_sessions_src",
        host="db-that-does-not-resolve.invalid",
        port=server_address()[1],
        login="postgres",
        schema=dbname(src_url),
        extra={
            "options": "-c search_path=myschema",
            "sslmode": "disable",
            "hostaddr": server_address()[0],
            "cursor": "dictcursor",
            "keepalives_idle": 7,
        },
    )
    conn = connect("bf_sessions_src", application_name="t", timezone="Asia/Kolkata")
    try:
        assert show(conn, "search_path", "TimeZone", "client_encoding") == ["myschema", "Asia/Kolkata", "UTF8"]
        with conn.cursor() as cur:
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert cur.fetchone() == (False,)  # a tuple: the cursor extra does not reach our sessions
        assert conn.get_dsn_parameters()["keepalives_idle"] == "7"  # the extra beats our default (30)
        assert conn.get_dsn_parameters()["tcp_user_timeout"] == "60000"
    finally:
        conn.close()
    chunk = plan_chunks("2024-01-01", "2024-01-02", "day", "UTC")[0]
    spec = make_spec("bf_sessions_src", dst_url)
    assert transfer_chunk(spec, chunk).rows_extracted == 50  # unqualified 'ev' resolved in myschema


@pytest.mark.parametrize(
    "missing, fields, words",
    [
        ("host", dict(login="postgres", schema="postgres"), ["has no host", "Unix socket"]),
        ("database", dict(host="127.0.0.1", login="postgres"), ["has no database", "'schema' field"]),
        ("connection", None, ["does not exist", "AIRFLOW_CONN_BF_SESSIONS_BAD"]),
    ],
)
def test_airflow_connection_without_host_or_database_is_refused(monkeypatch, missing, fields, words):
    if fields is not None:
        _airflow_conn(monkeypatch, "bf_sessions_bad", **fields)
    with pytest.raises(PermanentChunkError) as info:
        connect("bf_sessions_bad", application_name="t")
    assert all(w in str(info.value) for w in words), str(info.value)


def test_load_trigger_resolves_connection_extras_asynchronously(monkeypatch, src_url):
    """The triggerer path (async lookup, then the hook's resolution in a thread) honours extras too."""
    import asyncio

    from airflow_backfill_provider.triggers.load import SourceLoadTrigger

    _airflow_conn(
        monkeypatch,
        "bf_sessions_trig",
        host="db-that-does-not-resolve.invalid",
        port=server_address()[1],
        login="postgres",
        schema=dbname(src_url),
        extra={"hostaddr": server_address()[0], "sslmode": "disable"},
    )
    trigger = SourceLoadTrigger(conn_id="bf_sessions_trig", throttle={"max_active": 1000, "max_wait": 10})
    event = asyncio.run(asyncio.wait_for(trigger.run().__anext__(), 30))
    assert event.payload["status"] == "ok", event.payload


@pytest.mark.parametrize("key", ["source", "destination"])
def test_validate_operator_refuses_a_connection_url_with_a_password(key):
    from airflow_backfill_provider.operators.validate import ValidateBackfillOperator

    spec = specs.spec_dict("src_pg", "dst_pg")
    with pytest.raises(ValueError) as info:
        ValidateBackfillOperator(task_id="v", spec=spec, **{key: _SECRET_DSNS[0]})
    assert key in str(info.value) and "s3cret" not in str(info.value)
    ValidateBackfillOperator(task_id="v2", spec=spec, **{key: "postgresql://u@db.example/app"})  # no password: fine
