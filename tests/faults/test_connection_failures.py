"""Connections that cannot work: the plan task leaks no session, the chunk fails at once without retry.

- The plan task opens the destination, then the source. When the source connect fails (a database that does
  not exist, a connection id that does not exist), the destination session it already opened must be closed:
  counted in pg_stat_activity by the plan's application_name.
- A connection id that does not exist cannot be fixed by a retry. The chunk's first step (the source load
  probe) must fail the task at once (AirflowFailException naming the id and how to create it), on a real DAG
  run with retries configured: one try, state failed.
"""

from __future__ import annotations

import gc
import json

import pendulum
import pytest

from airflow_backfill_provider.core.compat import AirflowFailException
from airflow_backfill_provider.operators.chunk import BackfillChunkOperator
from tests.faults.conftest import DAY1, create_destination, make_spec, query
from tests.faults.test_bad_inputs import run_plan_task

pytestmark = pytest.mark.faults


def _plan_sessions(dst_url: str, dag_id: str) -> int:
    return query(
        dst_url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
        (f"backfill:{dag_id}:plan",),
    )[0][0]


def _missing_database(src_url: str) -> str:
    return src_url.rsplit("/", 1)[0] + "/bf_no_such_database"


@pytest.mark.parametrize(
    "source, expected, fragment",
    [
        (_missing_database, Exception, "bf_no_such_database"),  # psycopg2.OperationalError: retried by Airflow
        (lambda _: "no_such_source_conn", AirflowFailException, "'no_such_source_conn' does not exist"),
    ],
    ids=["database does not exist", "connection id does not exist"],
)
def test_plan_task_closes_the_destination_when_the_source_connect_fails(src_url, dst_url, source, expected, fragment):
    create_destination(dst_url)
    spec = make_spec(src_url, dst_url, name="planleak", source_conn_id=source(src_url))
    with pytest.raises(expected, match=fragment) as info:
        run_plan_task(spec.model_dump(mode="json"))
    gc.collect()
    # the error (and its traceback, which holds the task's frames) is still alive here, as in a task process
    assert info.value is not None
    assert _plan_sessions(dst_url, spec.effective_dag_id) == 0, "the plan task left its destination session open"


DAG_FILE = """\
import json, pathlib
import pendulum
from airflow_backfill_provider.core.compat import DAG
from airflow_backfill_provider.operators.chunk import BackfillChunkOperator
_cfg = json.loads((pathlib.Path(__file__).parent / "chunk_only.json").read_text())
with DAG(dag_id=_cfg["dag_id"], schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
    BackfillChunkOperator(task_id="load_chunk", spec=_cfg["spec"], chunk=_cfg["chunk"], retries=3,
                          retry_delay=0)
"""


@pytest.mark.parametrize("side", ["source", "destination"])
def test_missing_connection_id_fails_the_chunk_at_once(airflow_db, src_url, dst_url, tmp_path, monkeypatch, side):
    from airflow import settings

    create_destination(dst_url)
    missing = f"no_such_{side}_conn"
    spec = make_spec(src_url, dst_url, name=f"missing_{side}", **{f"{side}_conn_id": missing})
    dag_id = f"chunk_only_missing_{side}"
    cfg = {"dag_id": dag_id, "spec": spec.model_dump(mode="json"), "chunk": DAY1.to_descriptor()}
    (tmp_path / "chunk_only.json").write_text(json.dumps(cfg))
    (tmp_path / "chunk_only_dag.py").write_text(DAG_FILE)
    monkeypatch.setattr(settings, "DAGS_FOLDER", str(tmp_path))  # dag.test() on 3.x serializes the DAGs folder

    # a real run with retries=3: the chunk fails on its first try, not after four
    namespace: dict = {"__file__": str(tmp_path / "chunk_only_dag.py")}
    exec(compile(DAG_FILE, namespace["__file__"], "exec"), namespace)  # noqa: S102 - the file just written
    run = namespace["dag"].test()
    assert str(getattr(run.state, "value", run.state)) == "failed"
    (ti,) = run.get_task_instances()
    assert str(getattr(ti.state, "value", ti.state)) == "failed" and ti.try_number == 1, (ti.state, ti.try_number)

    # the operator itself: a clear, no-retry failure naming the id and the fix
    from airflow_backfill_provider.core.compat import DAG

    with DAG(dag_id=f"{dag_id}_direct", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")):
        op = BackfillChunkOperator(task_id="load_chunk", spec=cfg["spec"], chunk=cfg["chunk"])
    with pytest.raises(AirflowFailException, match=f"'{missing}' does not exist.*airflow connections add {missing}"):
        op.execute({})

    assert query(dst_url, "SELECT count(*), to_regclass('backfill_ledger') IS NULL FROM orders") == [(0, True)]
