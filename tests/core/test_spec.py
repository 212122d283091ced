"""Spec validation is pure; every error names the key and the valid choices."""

import pytest

from airflow_backfill_provider.core.exceptions import SpecError
from airflow_backfill_provider.core.spec import TableName, load_spec
from tests.specs import make_spec


def test_valid_spec_and_defaults():
    spec = make_spec()
    assert spec.effective_dag_id == "backfill_orders"
    assert spec.source.parts == ("orders",) and spec.destination.parts == ("public", "orders")
    assert spec.granularity == "day" and spec.pool == "backfill_source" and spec.mode == "upsert"
    assert spec.effective_schedule == "0 0 * * *"


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"granularity": "year"}, ["granularity", "'hour', 'day', 'week', 'month' or 'auto'"]),
        ({"timezone": "Mars/Olympus"}, ["timezone", "IANA"]),
        ({"key_columns": []}, ["key_columns"]),
        ({"mode": "merge"}, ["mode", "'upsert' or 'swap'"]),
        ({"colour": "red"}, ["colour", "unknown key", "valid keys are"]),
        ({"throttle": {"max_activ": 3}}, ["throttle.max_activ", "unknown key", "max_active"]),
        ({"throttle": {"max_active": 10, "critical_active": 5}}, ["critical_active", "greater than"]),
        ({"columns": ["id", "amount"]}, ["columns must include", "created_at"]),
        ({"name": "orders; DROP TABLE x"}, ["name", "letters, digits"]),
        ({"key_columns": ["id", "id"]}, ["key_columns", "more than once"]),
    ],
)
def test_errors_name_key_and_choices(change, fragments):
    with pytest.raises(SpecError) as err:
        make_spec(**change)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_missing_required_keys_are_all_listed():
    with pytest.raises(SpecError) as err:
        load_spec({"name": "x"})
    for key in ("source_conn_id", "destination_table", "time_column", "key_columns"):
        assert f"{key}: is required" in str(err.value)


def test_table_names_keep_sql_as_data():
    t = TableName.parse("orders; DROP TABLE x")
    assert t.parts == ("orders; DROP TABLE x",)  # one (odd) name, later quoted by sql.Identifier
    assert TableName.parse({"schema": "a.b", "name": "c"}).parts == ("a.b", "c")
