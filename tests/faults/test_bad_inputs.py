"""Bad inputs: each is refused with its own exception type, a message naming the bad key/value and the
fix, and NOTHING written anywhere (no ledger table, no rows, no DDL; the decoy table ``x`` survives).

Layers, in the order a bad value meets them: the spec (``load_spec``), the trigger form (``Param``),
the range and plan (``resolve_range``/``build_plan``), the plan task (``PlanBackfillOperator``, which also
runs the catalog pre-flight), and the chunk itself (``transfer_chunk``/``prepare``, ``connect``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from psycopg2 import sql

from airflow_backfill_provider.core.compat import AirflowFailException
from airflow_backfill_provider.connections import connect as open_connection
from tests.seed import seed_orders
from airflow_backfill_provider.core.exceptions import PermanentChunkError, PlanError, SpecError
from airflow_backfill_provider.factory import build_backfill_dag
from airflow_backfill_provider.operators.plan import PlanBackfillOperator
from airflow_backfill_provider.plan.planning import build_plan, resolve_range
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.faults.conftest import DAY1, connect, create_destination, make_spec, query
from tests import specs

pytestmark = pytest.mark.faults

INJECT = "orders; DROP TABLE x"


@dataclass
class World:
    src: str
    dst: str

    def spec(self, **overrides):
        return make_spec(self.src, self.dst, **overrides)

    def spec_dict(self, **overrides) -> dict:
        return {**make_spec(self.src, self.dst).model_dump(mode="json"), **overrides}


@pytest.fixture(scope="module")
def world(databases) -> World:
    src, dst = databases.create("bsrc"), databases.create("bdst")
    s = connect(src)
    seed_orders(s, rows=480, days=2, start=dt.date(2024, 1, 1))
    with s.cursor() as cur:
        cur.execute("CREATE TABLE x (i int); INSERT INTO x VALUES (1)")  # the decoy every injection aims at
        # an older source table whose time column has another name
        cur.execute(
            "CREATE TABLE orders_old AS SELECT id, customer_id, status, amount, created_at AS created, updated_at, note FROM orders"
        )
    s.close()
    create_destination(dst)
    query(dst, "CREATE TABLE x (i int); INSERT INTO x VALUES (1); CREATE TABLE nokey (LIKE orders)")
    return World(src, dst)


def snapshot(url: str):
    """Every relation (name, kind) and every table's rows (count, md5): any write or DDL changes it."""
    rels = query(
        url,
        "SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%' "
        "AND c.relkind IN ('r', 'p', 'v', 'm', 'S') ORDER BY 1, 2",
    )
    rows = {}
    for schema, name, kind in rels:
        if kind in ("r", "p"):
            t = sql.Identifier(schema, name)
            rows[(schema, name)] = query(
                url,
                sql.SQL(
                    "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t"
                ).format(t),
            )[0]
    return rels, rows


# --- how each layer is driven ----------------------------------------------------------------------------
class FakeTI:
    """Only what PlanBackfillOperator.execute touches on the task instance (XCom push)."""

    def __init__(self):
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key, value):
        self.xcom[key] = value


def run_plan_task(spec_dict: dict, **params):
    args = {
        "start": "2024-01-01",
        "end": "2024-01-03",
        "granularity": "day",
        "reprocess": False,
        "dry_run": False,
        **params,
    }
    op = PlanBackfillOperator(task_id="plan", spec=spec_dict, **args)
    ti = FakeTI()
    return op.execute({"ti": ti}), ti.xcom


def resolve_param(name: str, value):
    """The trigger form's validation (UI, CLI and REST all run it before a run is created)."""
    dag = build_backfill_dag(specs.make_spec(name="params"))
    return dag.params.get_param(name).resolve(value)


def manual_range(start, end, tz="UTC"):
    spec = specs.make_spec(timezone=tz)
    return resolve_range(
        spec, param_start=start, param_end=end, run_type="manual", interval_start=None, interval_end=None
    )


@dataclass
class Case:
    id: str
    run: Callable[[World], Any]
    error: type | str  # a class, or a class name (Airflow's ParamValidationError moved between versions)
    fragments: tuple[str, ...]  # the message names the bad key/value and the fix


def spec_case(id, key, value, *fragments):
    return Case(id, lambda w: load_spec(w.spec_dict(**{key: value})), SpecError, (key, *fragments))


def chunk_case(id, fragments, **overrides):
    return Case(id, lambda w: transfer_chunk(w.spec(**overrides), DAY1), PermanentChunkError, fragments)


CASES = [
    # --- the spec --------------------------------------------------------------------------------------
    spec_case(
        "spec: unknown granularity",
        "granularity",
        "fortnight",
        "'fortnight' is not valid",
        "'hour', 'day', 'week', 'month' or 'auto'",
    ),
    spec_case(
        "spec: unknown timezone",
        "timezone",
        "Mars/Olympus",
        "'Mars/Olympus' is not a known IANA timezone",
        "America/New_York",
    ),
    spec_case("spec: misspelt key", "granularty", "day", "unknown key", "valid keys are", "granularity"),
    spec_case("spec: key_columns not a list", "key_columns", "id", "should be a valid list"),
    spec_case("spec: timeout not a number", "statement_timeout_s", "soon", "should be a valid number"),
    spec_case("spec: negative retries", "retries", -1, "greater than or equal to 0"),
    spec_case("spec: unknown copy_format", "copy_format", "csv", "'csv' is not valid", "'binary' or 'text'"),
    spec_case("spec: SQL in the name (becomes the dag_id)", "name", INJECT, INJECT, "may only contain letters"),
    spec_case("spec: empty source_table", "source_table", "", "must be a table name such as 'orders'"),
    # --- the trigger form (Param) -----------------------------------------------------------------------
    Case(
        "param: start of the wrong type (123)",
        lambda w: resolve_param("start", 123),
        "ParamValidationError",
        ("123", "is not of type"),
    ),
    Case(
        "param: SQL in start",
        lambda w: resolve_param("start", "2024-01-01'; DROP TABLE orders; --"),
        "ParamValidationError",
        ("DROP TABLE orders", "is not a 'date'"),
    ),
    Case(
        "param: impossible date",
        lambda w: resolve_param("end", "2024-02-30"),
        "ParamValidationError",
        ("2024-02-30", "is not a 'date'"),
    ),
    Case(
        "param: unknown granularity",
        lambda w: resolve_param("granularity", "fortnight"),
        "ParamValidationError",
        ("fortnight", "is not one of", "'hour'"),
    ),
    Case(
        "param: reprocess='maybe'",
        lambda w: resolve_param("reprocess", "maybe"),
        "ParamValidationError",
        ("maybe", "is not of type 'boolean'"),
    ),
    # --- the range and the plan -------------------------------------------------------------------------
    Case(
        "range: end before start",
        lambda w: build_plan(w.spec(), "2024-01-05", "2024-01-01"),
        PlanError,
        ("end (2024-01-01) must be after start (2024-01-05)", "[start, end)"),
    ),
    Case(
        "range: empty (end == start)",
        lambda w: build_plan(w.spec(), "2024-01-05", "2024-01-05"),
        PlanError,
        ("must be after start",),
    ),
    Case(
        "range: more chunks than max_chunks",
        lambda w: build_plan(w.spec(), "2000-01-01", "2024-01-01", granularity="hour"),
        PlanError,
        ("max_chunks=100000", "batches", "coarser granularity ('day' or 'week' or 'month')"),
    ),
    Case(
        "range: unknown granularity param",
        lambda w: build_plan(w.spec(), "2024-01-01", "2024-01-02", granularity="day; DROP TABLE x"),
        PlanError,
        ("granularity='day; DROP TABLE x' is not valid", "choose one of hour, day, week, month"),
    ),
    Case(
        "range: SQL in start",
        lambda w: manual_range("2024-01-01'; DROP TABLE orders; --", "2024-02-01"),
        PlanError,
        ('start="2024-01-01\'; DROP TABLE orders; --" is not a date', "YYYY-MM-DD"),
    ),
    Case(
        "range: start of the wrong type (123)",
        lambda w: manual_range(123, "2024-02-01"),
        PlanError,
        ("start=123 is not a date", "YYYY-MM-DD"),
    ),
    Case(
        "range: impossible date",
        lambda w: manual_range("2024-01-01", "2024-02-30"),
        PlanError,
        ("end='2024-02-30' is not a date",),
    ),
    Case(
        "range: only start given",
        lambda w: manual_range("2024-01-01", None),
        PlanError,
        ("param 'end' is empty", "give both start and end"),
    ),
    Case(
        "range: manual run without dates",
        lambda w: manual_range(None, None),
        PlanError,
        ("needs the params 'start' and 'end'", "--conf"),
    ),
    # --- the plan task (runs the pre-flight against both databases) -------------------------------------
    Case(
        "plan task: dry_run='maybe'",
        lambda w: run_plan_task(w.spec_dict(), dry_run="maybe"),
        AirflowFailException,
        ("dry_run='maybe' is not a boolean", "true or false"),
    ),
    Case(
        "plan task: reprocess='maybe'",
        lambda w: run_plan_task(w.spec_dict(), reprocess="maybe"),
        AirflowFailException,
        ("reprocess='maybe' is not a boolean",),
    ),
    Case(
        "plan task: SQL in end",
        lambda w: run_plan_task(w.spec_dict(), end="2024-01-03'; DROP TABLE x; --"),
        AirflowFailException,
        ("DROP TABLE x", "is not a date"),
    ),
    Case(
        "plan task: granularity with SQL",
        lambda w: run_plan_task(w.spec_dict(), granularity="hour; DROP TABLE x"),
        AirflowFailException,
        ("granularity='hour; DROP TABLE x' is not valid",),
    ),
    Case(
        "plan task: end before start",
        lambda w: run_plan_task(w.spec_dict(), start="2024-01-03", end="2024-01-01"),
        AirflowFailException,
        ("must be after start",),
    ),
    Case(
        "plan task: too many chunks",
        lambda w: run_plan_task(w.spec_dict(), start="2000-01-01", end="2024-01-01", granularity="hour"),
        AirflowFailException,
        ("max_chunks=100000",),
    ),
    Case(
        "plan task: unknown source table",
        lambda w: run_plan_task(w.spec_dict(source_table=INJECT)),
        AirflowFailException,
        (f"source table '{INJECT}' does not exist", "check source_table"),
    ),
    Case(
        "plan task: no unique key in destination",
        lambda w: run_plan_task(w.spec_dict(destination_table="nokey")),
        AirflowFailException,
        ("no unique constraint", "key_columns=['id']", "ADD PRIMARY KEY (id)"),
    ),
    Case(
        "plan task: connection id does not exist",
        lambda w: run_plan_task(w.spec_dict(destination_conn_id="no_such_dest")),
        AirflowFailException,
        ("'no_such_dest' does not exist", "airflow connections add no_such_dest", "AIRFLOW_CONN_NO_SUCH_DEST"),
    ),
    # --- the chunk: catalog pre-flight, names as identifiers, never as SQL ------------------------------
    chunk_case(
        "chunk: SQL in source_table",
        (f"source table '{INJECT}' does not exist", "check source_table"),
        source_table=INJECT,
    ),
    chunk_case(
        "chunk: quotes in source_table",
        ("source table 'orders\"; DROP TABLE x; --' does not exist",),
        source_table='orders"; DROP TABLE x; --',
    ),
    chunk_case(
        "chunk: SQL in the schema part",
        ("source table 'public; DROP TABLE x.orders' does not exist in schema 'public; DROP TABLE x'",),
        source_table="public; DROP TABLE x.orders",
    ),
    chunk_case(
        "chunk: unknown unicode source_table",
        ("source table 'bestellungen_ü' does not exist",),
        source_table="bestellungen_ü",
    ),
    chunk_case(
        "chunk: SQL in destination_table",
        ('destination table "public.orders\'); DROP TABLE x; --" does not exist', "check destination_table"),
        destination_table="public.orders'); DROP TABLE x; --",
    ),
    chunk_case(
        "chunk: SQL in time_column",
        ("has no column(s) ['created_at; DROP TABLE x']", "its columns are"),
        time_column="created_at; DROP TABLE x",
    ),
    chunk_case(
        "chunk: quotes in key_columns",
        ("has no column(s) ['id\"); DROP TABLE x; --']",),
        key_columns=['id"); DROP TABLE x; --'],
    ),
    chunk_case(
        "chunk: SQL in version_column",
        ("has no column(s) [\"updated_at' OR '1'='1\"]",),
        version_column="updated_at' OR '1'='1",
    ),
    chunk_case(
        "chunk: SQL in columns",
        ("has no column(s) ['amount); DROP TABLE x; --']",),
        columns=["id", "created_at", "updated_at", "amount); DROP TABLE x; --"],
    ),
    chunk_case(
        "chunk: time column missing in the source",
        ("source table 'orders_old' has no column 'created_at'", "its columns are"),
        source_table="orders_old",
    ),
    chunk_case(
        "chunk: no unique key on key_columns",
        ("no unique constraint or unique index on exactly key_columns=['id']", "ADD PRIMARY KEY (id)"),
        destination_table="nokey",
    ),
    chunk_case(
        "chunk: key_columns not the unique key",
        ("key_columns=['customer_id']", "found [['id']]"),
        key_columns=["customer_id"],
    ),
    chunk_case(
        "chunk: source connection id does not exist",
        ("'no_such_source' does not exist", "AIRFLOW_CONN_NO_SUCH_SOURCE"),
        source_conn_id="no_such_source",
    ),
    Case(
        "connect: connection id does not exist",
        lambda w: open_connection("no_such_conn", application_name="t"),
        PermanentChunkError,
        (
            "'no_such_conn' does not exist",
            "Admin -> Connections",
            "airflow connections add no_such_conn",
            "AIRFLOW_CONN_NO_SUCH_CONN",
        ),
    ),
]


def _is(err: BaseException, expected) -> bool:
    if isinstance(expected, str):
        return any(cls.__name__ == expected for cls in type(err).__mro__)
    return isinstance(err, expected)


@pytest.fixture()
def clean_world(world):
    yield world
    # a case that failed by writing the ledger must not make the next cases fail too
    query(world.dst, "DROP TABLE IF EXISTS backfill_ledger; TRUNCATE orders")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_any_write(clean_world, case):
    world = clean_world
    before = snapshot(world.src), snapshot(world.dst)
    with pytest.raises(Exception) as info:
        case.run(world)
    err = info.value
    assert _is(err, case.error), f"expected {case.error}, got {type(err).__name__}: {err}"
    message = str(err)
    missing = [f for f in case.fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"
    assert (snapshot(world.src), snapshot(world.dst)) == before, "something was written"
    assert query(world.dst, "SELECT to_regclass('backfill_ledger')") == [(None,)], "the ledger table was created"
    for url in (world.src, world.dst):
        assert query(url, "SELECT count(*) FROM x") == [(1,)], "table x was touched"


def test_the_suite_really_detects_writes(world):
    """The snapshot is not blind: a real chunk load changes it (and is then undone)."""
    before = snapshot(world.dst)
    transfer_chunk(world.spec(), DAY1)
    assert snapshot(world.dst) != before
    query(world.dst, "DROP TABLE backfill_ledger; TRUNCATE orders")
    assert snapshot(world.dst) == before
