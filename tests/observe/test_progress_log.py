"""Progress in the logs: the plan's size and estimate, each chunk's share of the whole and an ETA."""

from __future__ import annotations

import datetime as dt
import logging
import re

import pytest

from airflow_backfill_provider.observe.progress_log import chunk_message, estimate_rows, number, plan_message


@pytest.mark.parametrize(
    "i,n,rows_done,chunks_done,est,elapsed,expected",
    [
        (212, 730, 410, 300, 1000, 60.0,
         "chunk 212/730 committed; run: 300/730 chunks done (41%), 410 rows read; ETA 86 s"),  # 430 left, 5/s
        (1, 4, 100, 1, 400, 10.0, "chunk 1/4 committed; run: 1/4 chunks done (25%), 100 rows read; ETA 30 s"),
        (3, 4, 400, 4, 400, 40.0, "chunk 3/4 committed; run: 4/4 chunks done (100%), 400 rows read; ETA done"),
        (4, 4, 500, 5, 400, 40.0, "chunk 4/4 committed; run: 4/4 chunks done (100%), 500 rows read; ETA done"),
        (2, 4, 0, 2, 400, 40.0, "chunk 2/4 committed; run: 2/4 chunks done (50%), 0 rows read; ETA 40 s"),
        (1, 4, 50, 1, None, None, "chunk 1/4 committed; run: 1/4 chunks done (25%), 50 rows read; "
         "ETA unknown (no rate yet)"),
        (None, None, 50, 1, None, 10.0, "chunk committed: 50 rows read by this run so far"),  # old descriptor
    ],
)  # fmt: skip
def test_chunk_share_line(i, n, rows_done, chunks_done, est, elapsed, expected):
    assert (
        chunk_message(i, n, rows_done=rows_done, chunks_done=chunks_done, est_rows=est, elapsed_s=elapsed) == expected
    )


def test_descriptors_carry_position_total_and_estimate():
    ds = number([{"chunk_id": "a", "start": "s", "end": "e"}, {"chunk_id": "b", "start": "s", "end": "e"}], 700)
    assert [(d["chunk_id"], d["i"], d["n"], d["est"]) for d in ds] == [("a", 1, 2, 700), ("b", 2, 2, 700)]
    assert "est" not in number([{"chunk_id": "a"}], None)[0]


def test_plan_message():
    assert plan_message(730, 12, 2_190_000, 320.0).startswith(
        "Plan size: 730 chunk(s) to load, 12 already done; ~2,190,000 rows (source planner estimate); ~1.9 h of chunk time"
    )
    assert "no earlier chunks" in plan_message(3, 0, 10, None)


def test_estimate_is_the_source_planners(src_url, pg):
    from tests.seed import seed_orders
    from tests.specs import make_spec

    conn = pg(src_url)
    seed_orders(conn, rows=3000, days=30, start=dt.date(2023, 1, 1))
    conn.cursor().execute("ANALYZE orders")
    spec = make_spec()
    est = estimate_rows(
        conn, spec, dt.datetime(2023, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2023, 1, 11, tzinfo=dt.timezone.utc)
    )
    assert 500 <= est <= 2000  # ~1000 rows: an estimate, not a count
    assert estimate_rows(conn, make_spec(source_table="public.missing"), "2023-01-01", "2023-01-02") is None


def test_a_real_run_logs_the_plan_size_and_each_chunks_share(
    airflow_db, src_url, dst_url, pg, monkeypatch, caplog, capfd
):
    from tests.seed import create_orders, seed_orders
    from airflow_backfill_provider.loader import load_backfill_dags
    from tests.conftest import REPO

    seed_orders(pg(src_url), rows=400, days=4, start=dt.date(2023, 1, 1))
    pg(src_url).cursor().execute("ANALYZE orders")
    create_orders(pg(dst_url))
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_SOURCE_PG", src_url)
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_DEST_PG", dst_url)
    dag = load_backfill_dags(REPO / "dags" / "configs", strict=True).dags["backfill_orders"]
    caplog.set_level(logging.INFO)
    run = dag.test(run_conf={"start": "2023-01-01", "end": "2023-01-05"})
    assert str(getattr(run.state, "value", run.state)) == "success"
    out = capfd.readouterr()
    text = caplog.text + out.out + out.err  # 3.x logs through structlog to stdout, 2.11 through logging
    assert re.search(
        r"Plan size: 4 chunk\(s\) to load, 0 already done; ~\d[\d,]* rows \(source planner estimate\)", text
    )
    # in the order they were logged (2.11 logs each line twice: keep the first of each)
    lines = re.findall(
        r"chunk (\d)/4 committed; run: (\d)/4 chunks done \((\d+)%\), (\d+) rows read; ETA ([^\n\[]+)", text
    )
    shares = list(dict.fromkeys(lines))
    assert sorted(s[0] for s in shares) == ["1", "2", "3", "4"], text[-3000:]
    # the share is of the run's chunks committed so far, whatever order the chunks ran in: monotonic, ends at 100%
    assert [int(s[2]) for s in shares] == [25, 50, 75, 100]
    assert [int(s[3]) for s in shares] == sorted(int(s[3]) for s in shares)  # rows read so far only grow
    assert shares[-1][4].strip() == "done"
