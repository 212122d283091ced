"""Any number of chunks from one trigger: batches (plan/batches.py), pure and through a real dag.test() run."""

from __future__ import annotations

import datetime as dt
import json

import pendulum
import pytest

from airflow_backfill_provider.plan import batches
from airflow_backfill_provider.core.chunks import Chunk, plan_chunks, split_at
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.plan.keyranges import plan_key_chunks
from airflow_backfill_provider.plan.sizing import auto_time_chunks
from airflow_backfill_provider.core.spec import load_spec
from tests.conftest import fetch_all
from tests.specs import spec_dict

#: the DAG tests reach the databases through these Airflow connection ids (AIRFLOW_CONN_BF_SRC/_DST)
BASE = spec_dict("bf_src", "bf_dst")


def _same(a: list[Chunk], b: list[Chunk]) -> bool:
    return [(c.start.timestamp(), c.end.timestamp(), c.key_lo, c.key_hi) for c in a] == [
        (c.start.timestamp(), c.end.timestamp(), c.key_lo, c.key_hi) for c in b
    ]


def _hours():
    return plan_chunks("2022-01-01", "2024-01-01", "hour", "America/New_York", max_chunks=100_000)


def _auto():
    lo, hi = pendulum.datetime(2022, 1, 1), pendulum.datetime(2024, 1, 1)
    return auto_time_chunks(lo, hi, "UTC", lambda a, b: (b - a) / 3600 * 7, 60)  # 7 rows/hour, 60 per chunk


def _keys():
    lo, hi = pendulum.datetime(2022, 1, 1), pendulum.datetime(2024, 1, 1)
    return plan_key_chunks("id", lo, hi, list(range(100, 300_100, 100)), 1)


# the hour and auto plans are tens of thousands of chunks: seconds of CPU each, so `make check`, not `make unit`
@pytest.mark.parametrize(
    "make, granularity, tz",
    [
        pytest.param(_hours, "hour", "America/New_York", marks=pytest.mark.heavy),
        pytest.param(_auto, "auto", "UTC", marks=pytest.mark.heavy),
        (_keys, "key", "UTC"),
    ],
)
@pytest.mark.parametrize("skip_every", [0, 7])  # 7: every 7th chunk is done already (holes in the batches)
def test_batches_are_few_small_and_expand_to_exactly_the_planned_chunks(make, granularity, tz, skip_every):
    spec = load_spec({**BASE, "timezone": tz})
    chunks = make()
    assert len(chunks) > spec.max_mapped_chunks
    if skip_every:
        chunks = [c for i, c in enumerate(chunks) if i % skip_every]
    mapped = batches.descriptors(spec, chunks, granularity=granularity)
    assert len(mapped) <= spec.max_batches
    assert max(len(json.dumps(d)) for d in mapped) < (400 if granularity == "hour" else 4000)
    expanded = [c for d in mapped for c in batches.expand(d, spec)]
    assert expanded == chunks  # exactly the plan's chunks: edges, key ranges and ids; holes stay holes


def test_few_chunks_stay_one_mapped_instance_each():
    spec = load_spec(BASE)
    chunks = plan_chunks("2024-01-01", "2024-02-01", "day", "UTC")
    assert batches.descriptors(spec, chunks, granularity="day") == [c.to_descriptor() for c in chunks]


@pytest.mark.heavy
def test_historical_splits_survive_the_batch_round_trip():
    spec = load_spec({**BASE, "historical": [{"until": "2022-03-01T12:30:00", "source_table": "orders_old"}]})
    chunks = split_at(_hours(), [pendulum.datetime(2022, 3, 1, 12, 30, tz="America/New_York")])
    spec = load_spec({**spec.model_dump(), "timezone": "America/New_York"})
    expanded = [c for d in batches.descriptors(spec, chunks, granularity="hour") for c in batches.expand(d, spec)]
    assert expanded == chunks


@pytest.mark.heavy
def test_key_batches_keep_each_chunks_own_time_range_across_a_historical_split():
    """Issue 25 (N1): a key batch carried its first chunk's time range only, so the halves after ``until``
    were never read and the halves before it loaded twice."""
    until = pendulum.datetime(2022, 7, 1, 6, tz="UTC")
    spec = load_spec({**BASE, "historical": [{"until": until.isoformat(), "source_table": "orders_old"}]})
    chunks = split_at(_keys(), [until])
    mapped = batches.descriptors(spec, chunks, granularity="key")
    assert len(mapped) > 1 and max(len(json.dumps(d)) for d in mapped) < 4000
    expanded = [c for d in mapped for c in batches.expand(d, spec)]
    assert expanded == chunks
    assert {(c.start, c.end) for c in expanded} == {(_keys()[0].start, until), (until, _keys()[0].end)}


def test_a_single_chunk_descriptor_expands_to_a_batch_of_one():
    spec = load_spec(BASE)
    chunk = _keys()[3]
    assert batches.expand(chunk.to_descriptor(), spec) == [chunk]


def test_sub_second_edges_keep_their_exact_instants():
    spec = load_spec({**BASE, "max_mapped_chunks": 1, "max_batches": 1})
    chunks = plan_chunks("2024-01-01T00:00:00.250000", "2024-01-03T00:00:00.5", "day", "UTC")
    (mapped,) = batches.descriptors(spec, chunks, granularity="day")
    assert batches.expand(mapped, spec) == chunks


# --- 2 years of hours from one trigger ------------------------------------------------------------------

BAD_ID = 9000  # one row, in one hour only, whose status does not fit the destination's varchar(8)


def dag_for_test(spec: dict, tmp_path, monkeypatch):
    """dag.test() on 3.x syncs the dags folder: put a DAG file building this spec in a private one."""
    from airflow import settings

    from airflow_backfill_provider.factory import build_backfill_dag

    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "the_dag.py").write_text(
        "import json, pathlib\n"
        "from airflow_backfill_provider.factory import build_backfill_dag\n"
        "dag = build_backfill_dag(json.loads((pathlib.Path(__file__).parent / 'spec.json').read_text()))\n"
    )
    monkeypatch.setattr(settings, "DAGS_FOLDER", str(tmp_path))
    return build_backfill_dag(spec)


@pytest.fixture()
def two_years_of_hours(airflow_db, src_url, dst_url, pg, monkeypatch, tmp_path):
    seed_orders(pg(src_url), rows=17520, days=730, start=dt.date(2022, 1, 1))  # one row per hour
    create_orders(pg(dst_url))
    pg(dst_url).cursor().execute("ALTER TABLE orders ALTER status TYPE varchar(8)")
    pg(src_url).cursor().execute("UPDATE orders SET status = 'cancelled-by-fraud-check' WHERE id = %s", (BAD_ID,))
    monkeypatch.setenv("AIRFLOW_CONN_BF_SRC", src_url)
    monkeypatch.setenv("AIRFLOW_CONN_BF_DST", dst_url)
    spec = {
        **BASE,
        "name": "hours17520",
        "granularity": "hour",
        "validation": {"enabled": False},
        "watermark": {"enabled": False},
        "retries": 0,
    }
    return dag_for_test(spec, tmp_path, monkeypatch), load_spec(spec)


@pytest.mark.timeout(1500)
@pytest.mark.skipif(
    __import__("importlib.metadata").metadata.version("apache-airflow").startswith("2."),
    reason="the full-size run is the primary target's (3.3); on 2.11 the 120-hour twin below covers batches",
)
def test_17520_hours_from_one_trigger_then_the_failed_hour_alone(two_years_of_hours, src_url, dst_url, pg):
    dag, spec = two_years_of_hours
    run = dag.test(run_conf={"start": "2022-01-01", "end": "2024-01-01"})
    # the bad hour fails its batch (permanently: a data error); every other hour is committed and recorded
    assert str(getattr(run.state, "value", run.state)) == "failed"
    assert fetch_all(dst_url, "SELECT count(*), count(DISTINCT range_start) FROM backfill_ledger") == [(17519, 17519)]
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(17519,)]
    mapped = batches.descriptors(
        spec, plan_chunks("2022-01-01", "2024-01-01", "hour", "UTC", max_chunks=100_000), granularity="hour"
    )
    assert len(mapped) <= 256
    # fix the data, then "clear" the failed batch: only the failed hour runs
    bad_at = fetch_all(src_url, "SELECT created_at FROM orders WHERE id = %s", (BAD_ID,))[0][0]
    pg(src_url).cursor().execute("UPDATE orders SET status = 'new' WHERE id = %s", (BAD_ID,))
    failed = [d for d in mapped if any(c.start <= bad_at < c.end for c in batches.expand(d, spec))]
    assert len(failed) == 1
    fixed_at = fetch_all(dst_url, "SELECT now()")[0][0]
    from airflow_backfill_provider.core.compat import DAG
    from airflow_backfill_provider.operators.chunk import BackfillChunkOperator

    with DAG(dag_id="bf_batch_retry", schedule=None, start_date=pendulum.datetime(2022, 1, 1)):
        op = BackfillChunkOperator(task_id="load_chunk", spec=spec.model_dump(mode="json"), chunk=failed[0])
    result = op.execute({})
    assert result["loaded"] == 1 and result["chunks"] > 1
    assert fetch_all(dst_url, "SELECT count(*) FROM backfill_ledger WHERE finished_at > %s", (fixed_at,)) == [(1,)]
    assert fetch_all(dst_url, "SELECT count(*) FROM backfill_ledger") == [(17520,)]
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(17520,)]


def test_a_batch_goes_past_a_bad_chunk_and_its_retry_loads_only_that_chunk(src_url, dst_url, pg):
    """The batch semantics of the 17,520-hour test, fast: 120 hours in batches of 40, one bad hour."""
    from airflow_backfill_provider.core.compat import DAG, AirflowFailException
    from airflow_backfill_provider.operators.chunk import BackfillChunkOperator

    seed_orders(pg(src_url), rows=240, days=5, start=dt.date(2022, 1, 1))  # two rows per hour
    create_orders(pg(dst_url))
    pg(dst_url).cursor().execute("ALTER TABLE orders ALTER status TYPE varchar(8)")
    pg(src_url).cursor().execute("UPDATE orders SET status = 'cancelled-by-fraud-check' WHERE id = 50")
    spec = load_spec(
        {
            **BASE,
            "source_conn_id": src_url,
            "destination_conn_id": dst_url,
            "granularity": "hour",
            "max_mapped_chunks": 10,
            "max_batches": 3,
            "watermark": {"enabled": False},
        }
    )
    mapped = batches.descriptors(spec, plan_chunks("2022-01-01", "2022-01-06", "hour", "UTC"), granularity="hour")
    assert len(mapped) == 3

    def run(descriptor, waited_pacing_s=None):
        with DAG(dag_id="bf_batch", schedule=None, start_date=pendulum.datetime(2022, 1, 1)):
            op = BackfillChunkOperator(task_id="load_chunk", spec=spec.model_dump(mode="json"), chunk=descriptor)
        if waited_pacing_s is None:
            return op.execute({})
        return op.execute_after_pacing({}, event={"waited_s": waited_pacing_s})  # resumed at its pacing turn

    with pytest.raises(AirflowFailException, match=r"1 of 40 chunk\(s\) failed, the other 39 are committed") as err:
        run(mapped[0])
    assert "2022-01-02T00:00+00:00" in str(err.value) and "status" in str(err.value)
    assert [run(mapped[1])["loaded"], run(mapped[2], waited_pacing_s=2.5)["loaded"]] == [40, 40]
    assert fetch_all(dst_url, "SELECT count(*) FROM backfill_ledger") == [(119,)]
    # the batch's wait is in the ledger row of the first chunk it loaded after it; every chunk's wait is measured
    waited = "SELECT chunk_id, waited_load_s, waited_pacing_s FROM backfill_ledger WHERE waited_pacing_s > 0"
    assert fetch_all(dst_url, waited) == [(batches.expand(mapped[2], spec)[0].chunk_id, 0.0, 2.5)]
    assert fetch_all(dst_url, "SELECT count(*) FROM backfill_ledger WHERE waited_load_s IS NULL") == [(0,)]
    pg(src_url).cursor().execute("UPDATE orders SET status = 'new' WHERE id = 50")
    fixed_at = fetch_all(dst_url, "SELECT now()")[0][0]
    assert run(mapped[0]) == {"batch": mapped[0]["chunk_id"], "chunks": 40, "loaded": 1, "rows": 2}
    assert fetch_all(dst_url, "SELECT count(*) FROM backfill_ledger WHERE finished_at > %s", (fixed_at,)) == [(1,)]
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(240,)]


def test_each_chunk_of_a_batch_records_its_own_counts(src_url, dst_url, pg):
    """PostgreSQL keeps a session's per-transaction write counters across commits until it flushes its
    statistics: a batch's chunks share one session, and their ledger rows read 24/48/-24, then 24/72/-48."""
    from airflow_backfill_provider.core.compat import DAG
    from airflow_backfill_provider.operators.chunk import BackfillChunkOperator

    seed_orders(pg(src_url), rows=96, days=4, start=dt.date(2022, 1, 1))  # 24 rows a day
    create_orders(pg(dst_url))
    spec = load_spec(
        {
            **BASE,
            "source_conn_id": src_url,
            "destination_conn_id": dst_url,
            "granularity": "day",
            "max_mapped_chunks": 1,
            "max_batches": 1,
            "watermark": {"enabled": False},
        }
    )
    (batch,) = batches.descriptors(spec, plan_chunks("2022-01-01", "2022-01-05", "day", "UTC"), granularity="day")
    counts = (
        "SELECT rows_extracted, rows_inserted, rows_updated, rows_unchanged FROM backfill_ledger ORDER BY range_start"
    )

    def run():
        with DAG(dag_id="bf_batch_counts", schedule=None, start_date=pendulum.datetime(2022, 1, 1)):
            op = BackfillChunkOperator(task_id="load_chunk", spec=spec.model_dump(mode="json"), chunk=batch)
        return op.execute({})

    assert run()["loaded"] == 4
    assert fetch_all(dst_url, counts) == [(24, 24, 0, 0)] * 4
    pg(dst_url).cursor().execute("DELETE FROM backfill_ledger")  # load them again: every row is unchanged
    assert run()["loaded"] == 4
    assert fetch_all(dst_url, counts) == [(24, 0, 0, 24)] * 4
