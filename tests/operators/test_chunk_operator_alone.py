"""BackfillChunkOperator used on its own, without the factory or a plan task: a DAG of one chunk run with
dag.test() on a real database; and the gate state it carries through deferrals (operators/chunkrun.py)."""

from __future__ import annotations

import datetime as dt
import json

import pendulum
import pytest

from airflow_backfill_provider.operators.chunkrun import ChunkRun
from airflow_backfill_provider.throttle.probe import LoadSample
from tests.conftest import fetch_all
from tests.seed import create_orders, seed_orders
from tests.specs import spec_json

#: New York's 2024-01-02 is [05:00, 05:00 next day) UTC: read as UTC, the chunk would load other rows
NY_DAY = "created_at >= '2024-01-02 00:00 America/New_York' AND created_at < '2024-01-03 00:00 America/New_York'"


#: what a user writes: one operator, no factory, no plan task (dag.test() on 3.x runs the DAGs folder's file)
DAG_FILE = """\
import json, pathlib
import pendulum
from airflow_backfill_provider.core.compat import DAG
from airflow_backfill_provider.operators.chunk import BackfillChunkOperator
from airflow_backfill_provider.core.spec import load_spec
_cfg = json.loads((pathlib.Path(__file__).parent / "chunk_alone.json").read_text())
with DAG(dag_id=_cfg["dag_id"], schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
    BackfillChunkOperator(
        task_id="load_jan_2",
        spec=load_spec(_cfg["spec"]) if _cfg["spec_as"] == "model" else _cfg["spec"],
        # dates without an offset are read in the spec's timezone, as in the trigger form
        chunk={"chunk_id": "2024-01-02", "start": "2024-01-02", "end": "2024-01-03"},
    )
"""


@pytest.mark.parametrize("spec_as", ["model", "dict"])
def test_one_chunk_operator_alone_loads_its_local_day(airflow_db, src_url, dst_url, pg, tmp_path, monkeypatch, spec_as):
    from airflow import settings

    seed_orders(pg(src_url), rows=900, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    cfg = {
        "dag_id": f"chunk_alone_{spec_as}",
        "spec_as": spec_as,
        "spec": spec_json(src_url, dst_url, timezone="America/New_York"),
    }
    (tmp_path / "chunk_alone.json").write_text(json.dumps(cfg))
    (tmp_path / "chunk_alone_dag.py").write_text(DAG_FILE)
    monkeypatch.setattr(settings, "DAGS_FOLDER", str(tmp_path))
    namespace: dict = {"__file__": str(tmp_path / "chunk_alone_dag.py")}
    exec(compile(DAG_FILE, namespace["__file__"], "exec"), namespace)  # noqa: S102 - the file just written

    run = namespace["dag"].test()
    assert str(getattr(run.state, "value", run.state)) == "success"
    expected = fetch_all(src_url, f"SELECT count(*), min(id), max(id) FROM orders WHERE {NY_DAY}")
    assert expected[0][0] == 300
    assert fetch_all(dst_url, "SELECT count(*), min(id), max(id) FROM orders") == expected
    ledger = fetch_all(dst_url, "SELECT chunk_id, rows_extracted, range_start FROM backfill_ledger")
    assert [(c, n) for c, n, _ in ledger] == [("2024-01-02", 300)]
    assert ledger[0][2] == pendulum.datetime(2024, 1, 2, tz="America/New_York")


def test_chunk_descriptor_with_end_before_start_is_refused():
    from airflow_backfill_provider.core.chunks import Chunk
    from airflow_backfill_provider.core.exceptions import PlanError

    with pytest.raises(PlanError, match="expected keys chunk_id, start, end"):
        Chunk.from_descriptor({"chunk_id": "x", "start": "2024-01-03", "end": "2024-01-02"}, "UTC")
    with pytest.raises(PlanError, match="expected keys chunk_id, start, end"):
        Chunk.from_descriptor({"chunk_id": "x", "start": "12:00", "end": "2024-01-02"}, "UTC")  # a time, not a date


# --- the gate state between deferrals -----------------------------------------------------------------------
SAMPLE = LoadSample(active=3, replica_lag=None, sampled_at=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)).to_dict()


def test_state_after_a_load_wait_goes_straight_to_pacing_with_the_triggers_sample():
    run = ChunkRun.after_load_wait(
        {"status": "ok", "waited_s": 4.5, "sample": SAMPLE, "carry": {"waited_pacing_s": 2.0}}
    )
    assert (run.waited_load_s, run.waited_pacing_s, run.probed, run.paced) == (4.5, 2.0, True, False)
    assert run.sample is not None and run.sample.active == 3
    assert run.carry_through_pacing() == {"waited_load_s": 4.5, "waited_pacing_s": 2.0}


def test_state_after_pacing_adds_the_turns_wait_and_probes_again():
    before = ChunkRun(waited_load_s=4.5, waited_pacing_s=2.0)
    run = ChunkRun.after_pacing({"waited_s": 1.5, "carry": before.carry_through_pacing()})
    assert (run.waited_load_s, run.waited_pacing_s, run.probed, run.paced) == (4.5, 3.5, False, True)
    assert run.sample is None
    assert run.carry_through_load_wait() == {"waited_pacing_s": 3.5}


def test_state_closes_the_trys_sessions(src_url, pg):
    from airflow_backfill_provider.connections import connect

    run = ChunkRun(source_conn=connect(src_url, application_name="backfill:test:chunkrun"))
    conn, other = run.source_conn, connect(src_url, application_name="backfill:test:chunkrun")
    run.close(other)  # an error, a deferral or the end of the try: closed
    assert conn.closed and other.closed and run.source_conn is None
