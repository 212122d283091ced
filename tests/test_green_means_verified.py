"""A green run means verified data: second runs after the user changed the destination or the spec.

Driven as a user would: a YAML spec in a configs folder, the loader's DAG, ``dag.test(run_conf=...)`` (what
``airflow dags test`` runs), then the destination as it is. Each case ends exact and green, or red with a
message naming the cause; none ends green with wrong data (issue 25). Each failed on the release before:
- the destination dropped and re-created: the ledger said done, 0 of 48 rows, green (validate never ran);
- the destination truncated: the same, with the same table (oid) kept;
- ``columns:`` removed from the spec: the new column stayed NULL in every row, green;
- a destination-only ``NOT NULL DEFAULT`` / ``GENERATED ALWAYS AS`` / identity column: every chunk failed.
"""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import fetch_all

pytestmark = pytest.mark.slow

SOURCE = """
CREATE TABLE events (id bigint PRIMARY KEY, d timestamptz NOT NULL, amount numeric(12,2), note text,
                     updated_at timestamptz NOT NULL);
INSERT INTO events
SELECT g, timestamptz '2024-03-01 00:30+00' + (g - 1) * interval '90 minutes', g * 1.25, 'n' || g,
       timestamptz '2024-04-01 00:00+00'
FROM generate_series(1, 48) g;
"""

DEST = """
CREATE TABLE events (id bigint PRIMARY KEY, d timestamptz NOT NULL, amount numeric(12,2), note text,
                     updated_at timestamptz NOT NULL {extra});
"""

RUN = {"start": "2024-03-01", "end": "2024-03-04"}


def _state(run) -> str:
    return str(getattr(run.state, "value", run.state))


def _task_states(run) -> dict[str, str]:
    out: dict[str, str] = {}
    for ti in run.get_task_instances():
        out.setdefault(ti.task_id, str(getattr(ti.state, "value", ti.state)))
    return out


@pytest.fixture()
def make_dag(airflow_db, src_url, dst_url, pg, tmp_path, monkeypatch):
    """``make_dag(**spec_overrides)``: write the YAML spec and return its DAG, built by the loader."""
    monkeypatch.setenv("AIRFLOW_CONN_GMV_SRC", src_url)
    monkeypatch.setenv("AIRFLOW_CONN_GMV_DST", dst_url)
    pg(src_url).cursor().execute(SOURCE)

    def make(name: str = "events", **overrides):
        from airflow_backfill_provider.loader import load_backfill_dags

        spec = dict(
            name=name,
            source_conn_id="gmv_src",
            destination_conn_id="gmv_dst",
            source_table="public.events",
            destination_table="public.events",
            time_column="d",
            key_columns=["id"],
            version_column="updated_at",
            granularity="day",
            timezone="UTC",
            pool="default_pool",
            start_date="2024-01-01",
        )
        spec.update(overrides)
        from airflow import settings

        folder = tmp_path / "configs"
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        # the user's DAG file: dag.test() on 3.x syncs the dags folder and runs the DAG serialized from it
        (tmp_path / "backfills.py").write_text(
            "# backfill DAGs from YAML (without the words airflow and dag the DAG processor skips a file)\n"
            "import pathlib\n"
            "from airflow_backfill_provider.loader import register\n"
            "register(pathlib.Path(__file__).parent / 'configs', globals(), strict=True)\n"
        )
        monkeypatch.setattr(settings, "DAGS_FOLDER", str(tmp_path))
        return load_backfill_dags(folder, strict=True).dags[f"backfill_{name}"]

    return make


def _exact(src_url, dst_url, cols="id, d, amount, note, updated_at"):
    query = f"SELECT {cols} FROM events ORDER BY id"
    return fetch_all(src_url, query) == fetch_all(dst_url, query)


def test_recreated_destination_is_loaded_again(make_dag, src_url, dst_url, pg):
    pg(dst_url).cursor().execute(DEST.format(extra=""))
    dag = make_dag()
    assert _state(dag.test(run_conf=RUN)) == "success"
    assert _exact(src_url, dst_url)
    # the user re-creates the table (say, to partition it): the ledger's claims were about the old one
    pg(dst_url).cursor().execute("DROP TABLE events; " + DEST.format(extra=""))
    run = dag.test(run_conf=RUN)
    assert _state(run) == "success", _task_states(run)
    assert fetch_all(dst_url, "SELECT count(*) FROM events") == [(48,)]
    assert _exact(src_url, dst_url)
    assert _task_states(run).get("validate") == "success"


def test_truncated_destination_fails_validation_naming_the_cause(make_dag, dst_url, pg):
    pg(dst_url).cursor().execute(DEST.format(extra=""))
    dag = make_dag()
    assert _state(dag.test(run_conf=RUN)) == "success"
    pg(dst_url).cursor().execute("TRUNCATE events")  # same table (oid): the ledger cannot tell
    run = dag.test(run_conf=RUN)
    states = _task_states(run)
    assert _state(run) == "failed", states
    assert states.get("validate") == "failed", states
    # the validation report row says why, in the destination
    (reason,) = fetch_all(dst_url, "SELECT status FROM backfill_validation ORDER BY validated_at DESC LIMIT 1")[0]
    assert reason == "fail"
    # the next run with reprocess repairs it, green
    run = dag.test(run_conf={**RUN, "reprocess": True})
    assert _state(run) == "success", _task_states(run)
    assert fetch_all(dst_url, "SELECT count(*) FROM events") == [(48,)]


def test_validation_runs_when_every_chunk_is_skipped(make_dag, dst_url, pg):
    pg(dst_url).cursor().execute(DEST.format(extra=""))
    dag = make_dag()
    assert _state(dag.test(run_conf=RUN)) == "success"
    run = dag.test(run_conf=RUN)  # every chunk in the ledger: validation still checks the whole range
    states = _task_states(run)
    assert _state(run) == "success", states
    assert states.get("validate") == "success", states


def test_columns_removed_from_the_spec_loads_the_new_columns(make_dag, src_url, dst_url, pg):
    pg(dst_url).cursor().execute(DEST.format(extra=""))
    dag = make_dag(columns=["id", "d", "amount", "updated_at"])
    assert _state(dag.test(run_conf=RUN)) == "success"
    assert fetch_all(dst_url, "SELECT count(*) FROM events WHERE note IS NULL") == [(48,)]
    dag = make_dag()  # every column now
    run = dag.test(run_conf=RUN)
    assert _state(run) == "success", _task_states(run)
    assert fetch_all(dst_url, "SELECT count(*) FROM events WHERE note IS NULL") == [(0,)]
    assert _exact(src_url, dst_url)


def test_column_added_to_the_destination_is_filled_by_the_next_run(make_dag, src_url, dst_url, pg):
    pg(dst_url).cursor().execute(DEST.format(extra=""))
    pg(dst_url).cursor().execute("ALTER TABLE events DROP COLUMN note")
    dag = make_dag()
    assert _state(dag.test(run_conf=RUN)) == "success"
    pg(dst_url).cursor().execute("ALTER TABLE events ADD COLUMN note text")
    run = dag.test(run_conf=RUN)
    assert _state(run) == "success", _task_states(run)
    assert _exact(src_url, dst_url)


@pytest.mark.parametrize(
    "extra, check",
    [
        (", loaded_at timestamptz NOT NULL DEFAULT now()", "loaded_at IS NOT NULL"),
        (", twice numeric GENERATED ALWAYS AS (amount * 2) STORED", "twice = amount * 2"),
        (", seq bigint GENERATED ALWAYS AS IDENTITY", "seq IS NOT NULL"),
        (", seq bigint GENERATED BY DEFAULT AS IDENTITY", "seq IS NOT NULL"),
        (", flag boolean NOT NULL DEFAULT true", "flag"),
    ],
    ids=["default-now", "generated", "identity-always", "identity-by-default", "default-const"],
)
def test_destination_only_columns_are_filled_by_the_destination(make_dag, src_url, dst_url, pg, extra, check):
    pg(dst_url).cursor().execute(DEST.format(extra=extra))
    dag = make_dag()
    run = dag.test(run_conf=RUN)
    assert _state(run) == "success", _task_states(run)
    assert fetch_all(dst_url, f"SELECT count(*) FROM events WHERE {check}") == [(48,)]
    assert _exact(src_url, dst_url)
    # a rerun changes nothing and stays green (the filled column is not compared with the source)
    run = dag.test(run_conf={**RUN, "reprocess": True})
    assert _state(run) == "success", _task_states(run)
    assert fetch_all(dst_url, f"SELECT count(*) FROM events WHERE {check}") == [(48,)]


def test_destination_only_not_null_column_without_default_is_refused_by_the_plan(make_dag, dst_url, pg):
    pg(dst_url).cursor().execute(DEST.format(extra=", region text NOT NULL"))
    dag = make_dag()
    run = dag.test(run_conf=RUN)
    states = _task_states(run)
    assert _state(run) == "failed"
    assert states.get("plan") == "failed", states
    assert fetch_all(dst_url, "SELECT count(*) FROM events") == [(0,)]
    assert fetch_all(dst_url, "SELECT to_regclass('backfill_ledger') IS NULL") == [(True,)]


ARCHIVE = """
CREATE TABLE events_old (legacy_id bigint PRIMARY KEY, d timestamptz NOT NULL, amount numeric(12,2), note text,
                         updated_at timestamptz NOT NULL);
INSERT INTO events_old SELECT 1000 + g, timestamptz '2024-02-01 00:00+00' + (g - 1) * interval '40 minutes',
       g * 0.5, 'old' || g, timestamptz '2024-04-01 00:00+00'
FROM generate_series(1, 72) g;
"""


def test_key_batches_with_a_historical_table_read_every_row_once(make_dag, src_url, dst_url, pg):
    """Issue 25's N1: chunk_by key + a historical range with its own table + more chunks than
    max_mapped_chunks (batches). The release before read the halves after ``until`` never and the halves
    before it twice, and both batch tasks ended green."""
    pg(dst_url).cursor().execute(DEST.format(extra=""))
    pg(src_url).cursor().execute(ARCHIVE)
    dag = make_dag(
        chunk_by="key",
        target_chunk_rows=10,
        max_mapped_chunks=2,
        max_batches=2,
        historical=[
            {
                "until": "2024-02-02T00:00:00Z",
                "source_table": "public.events_old",
                "column_expressions": {"id": "legacy_id"},
            }
        ],
    )
    run = dag.test(run_conf={"start": "2024-02-01", "end": "2024-03-04"})
    assert _state(run) == "success", _task_states(run)
    expected = fetch_all(
        src_url,
        "SELECT legacy_id, d, amount, note FROM events_old WHERE d < '2024-02-02Z'"
        " UNION ALL SELECT id, d, amount, note FROM events WHERE d >= '2024-02-02Z' ORDER BY 1",
    )
    assert fetch_all(dst_url, "SELECT id, d, amount, note FROM events ORDER BY 1") == expected
    assert len(expected) == 36 + 48


def test_a_redefined_source_view_is_loaded_again(make_dag, src_url, dst_url, pg):
    """The source is a view; the user redefines it with the same columns (CREATE OR REPLACE VIEW: its columns'
    names and types, all a table's fingerprint sees, are unchanged). The ledger's claims were about the rows
    the old definition selected: the next run loads the range again and ends exact, not skipped and red."""
    pg(dst_url).cursor().execute(DEST.format(extra=""))
    view = "CREATE OR REPLACE VIEW events_v AS SELECT id, d, {amount} AS amount, note, updated_at FROM events"
    pg(src_url).cursor().execute(view.format(amount="amount"))
    dag = make_dag(source_table="public.events_v")
    assert _state(dag.test(run_conf=RUN)) == "success"
    pg(src_url).cursor().execute(view.format(amount="(amount * 2)::numeric(12,2)"))
    run = dag.test(run_conf=RUN)
    assert _state(run) == "success", _task_states(run)
    assert fetch_all(src_url, "SELECT id, amount FROM events_v ORDER BY id") == fetch_all(
        dst_url, "SELECT id, amount FROM events ORDER BY id"
    )
    assert fetch_all(dst_url, "SELECT sum(amount) FROM events") == fetch_all(
        src_url, "SELECT 2 * sum(amount) FROM events"
    )
