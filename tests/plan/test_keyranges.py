"""Key-range chunks (chunk_by: key) on real PostgreSQL: every row exactly once, on tables with gaps and skew."""

from __future__ import annotations

import psycopg2
import pytest

from tests.seed import create_orders
from airflow_backfill_provider.core.exceptions import PlanError
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all, plan_on, table_digest
from tests.specs import make_spec, spec_dict

#: key ranges of about 1,500 rows
KEY_RANGES = {"chunk_by": "key", "target_chunk_rows": 1500}

# ids as (first, last, step) runs: gaps between runs, dense and sparse runs (skew); created_at is scattered
# over 2023 independently of the id, so the time column is uncorrelated with the physical order
SHAPES = {
    "gaps_and_skew": [
        (1, 4000, 1),
        (1_000_000, 1_000_400, 1),
        (2_000_000, 2_012_000, 1),
        (5_000_000, 900_000_000, 3_000_000),
    ],
    "sparse_only": [(10, 50_000_000, 9_973)],
    "negative_and_huge": [(-9_000_000_000, -8_999_990_000, 7), (9_000_000_000_000, 9_000_000_003_000, 1)],
    "one_row": [(42, 42, 1)],
    "empty": [],
}


def _seed(url: str, runs) -> int:
    conn = psycopg2.connect(url)
    create_orders(conn)
    with conn.cursor() as cur:
        for first, last, step in runs:
            cur.execute(
                """INSERT INTO orders SELECT g, (g %% 97)::int, 'new', (g %% 1000) / 10.0,
                       '2023-01-01T00:00Z'::timestamptz + ((hashtext(g::text)::bigint & 2147483647) %% 31536000) * interval '1 second',
                       '2023-06-01T00:00Z', NULL
                   FROM generate_series(%s::bigint, %s::bigint, %s::bigint) g""",
                (first, last, step),
            )
        cur.execute("CREATE INDEX ON orders (created_at)")
        cur.execute("ANALYZE orders")
        cur.execute("SELECT count(*) FROM orders")
        n = cur.fetchone()[0]
    conn.commit()
    conn.close()
    return n


def _plan(spec, src, dst, start="2023-01-01", end="2024-01-01", **kw):
    return plan_on(spec, src, dst, start, end, **kw)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_key_ranges_load_every_row_exactly_once(shape, src_url, dst_url, pg):
    n = _seed(src_url, SHAPES[shape])
    create_orders(pg(dst_url))
    spec = make_spec(src_url, dst_url, **KEY_RANGES)
    plan = _plan(spec, src_url, dst_url)
    assert plan.granularity == "key" and all(c.keyed for c in plan.chunks)
    assert any("chunk_by key" in note for note in plan.notes)
    # the ranges partition every key: open at both ends, each starts where the previous ended
    assert plan.chunks[0].key_lo is None and plan.chunks[-1].key_hi is None
    assert all(a.key_hi == b.key_lo for a, b in zip(plan.chunks, plan.chunks[1:]))
    sizes = [transfer_chunk(spec, c).rows_extracted for c in plan.chunks]
    assert sum(sizes) == n
    assert table_digest(src_url) == table_digest(dst_url)
    assert fetch_all(dst_url, "SELECT sum(rows_inserted), sum(rows_updated), count(*) FROM backfill_ledger") == [
        (n, 0, len(plan.chunks))
    ]
    if n >= 10 * spec.target_chunk_rows:  # sized from the histogram: near the target, never one huge chunk
        assert len(plan.chunks) >= n // spec.target_chunk_rows // 2
        assert max(sizes) <= 3 * spec.target_chunk_rows, sizes
    # resumable: a second plan skips every range; a time plan over the same range is covered as well
    assert _plan(spec, src_url, dst_url).chunks == []
    time_spec = load_spec({**spec.model_dump(), "chunk_by": "time", "granularity": "month"})
    assert _plan(time_spec, src_url, dst_url).chunks == []


def test_rows_inserted_after_the_statistics_still_load(src_url, dst_url, pg):
    """The last range is open above: keys beyond the analyzed max (stale statistics) are not lost."""
    n = _seed(src_url, SHAPES["gaps_and_skew"])
    pg(src_url).cursor().execute(
        "INSERT INTO orders SELECT g, 1, 'new', 1, '2023-03-01T00:00Z', '2023-03-01T00:00Z', NULL"
        " FROM generate_series(990000000, 990000999) g"
    )
    create_orders(pg(dst_url))
    spec = make_spec(src_url, dst_url, **KEY_RANGES)
    for c in _plan(spec, src_url, dst_url).chunks:
        transfer_chunk(spec, c)
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(n + 1000,)]


def test_the_time_range_still_bounds_key_chunks(src_url, dst_url, pg):
    """Key chunks keep the run's time range: rows outside [start, end) (e.g. at/after the watermark) stay out."""
    _seed(src_url, SHAPES["gaps_and_skew"])
    create_orders(pg(dst_url))
    spec = make_spec(src_url, dst_url, **KEY_RANGES)
    for c in _plan(spec, src_url, dst_url, start="2023-01-01", end="2023-07-01").chunks:
        transfer_chunk(spec, c)
    expected = fetch_all(src_url, "SELECT count(*) FROM orders WHERE created_at < '2023-07-01T00:00Z'")
    assert fetch_all(dst_url, "SELECT count(*), max(created_at) < '2023-07-01T00:00Z' FROM orders") == [
        (expected[0][0], True)
    ]


def test_a_non_integer_key_is_refused_naming_it(src_url, dst_url, pg):
    pg(src_url).cursor().execute(
        "CREATE TABLE orders (id text PRIMARY KEY, created_at timestamptz, updated_at timestamptz)"
    )
    create_orders(pg(dst_url))
    with pytest.raises(PlanError, match=r"chunk_by: key needs an integer key_column; 'id' of orders is text"):
        _plan(make_spec(src_url, dst_url, **KEY_RANGES), src_url, dst_url)


@pytest.mark.parametrize("mode", ["upsert", "swap"])
def test_key_chunks_under_dag_test_compose_with_newer_wins_swap_and_validation(
    mode, airflow_db, src_url, dst_url, pg, monkeypatch, tmp_path
):
    """plan >> load_chunk[key ranges] (>> merge) >> validate, through dag.test(); validation per day passes."""
    from tests.plan.test_batches import dag_for_test

    n = _seed(src_url, SHAPES["gaps_and_skew"])
    create_orders(pg(dst_url))
    # live ingest already wrote a newer version of row 1: newer wins (swap mode: live rows are never touched)
    created = fetch_all(src_url, "SELECT created_at FROM orders WHERE id = 1")[0][0]
    pg(dst_url).cursor().execute(
        "INSERT INTO orders VALUES (1, 1, 'live', 1, %s, '2030-01-01T00:00Z', NULL)", (created,)
    )
    monkeypatch.setenv("AIRFLOW_CONN_BF_SRC", src_url)
    monkeypatch.setenv("AIRFLOW_CONN_BF_DST", dst_url)
    spec = spec_dict(
        "bf_src",
        "bf_dst",
        name=f"keys_{mode}",
        chunk_by="key",
        target_chunk_rows=3000,
        mode=mode,
        watermark={"enabled": False},
        # row 1's newer version exists only in the destination (faked above, the source never had it): its
        # day's checksum rightly differs, so it warns; counts and sums still decide pass/fail
        validation={"checksum": "warn"},
    )
    dag = dag_for_test(spec, tmp_path, monkeypatch)
    run = dag.test(run_conf={"start": "2023-01-01", "end": "2024-01-01"})
    assert str(getattr(run.state, "value", run.state)) == "success"
    assert fetch_all(dst_url, "SELECT count(*) FROM orders") == [(n,)]
    assert fetch_all(dst_url, "SELECT status FROM orders WHERE id = 1") == [("live",)]
    rest = "SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM orders t WHERE id <> 1"
    assert fetch_all(src_url, rest) == fetch_all(dst_url, rest)
    labels = [r[0] for r in fetch_all(dst_url, "SELECT chunk_id FROM backfill_ledger ORDER BY key_lo")]
    if mode == "upsert":  # swap mode's merge forgets the parallel table's ledger rows
        assert len(labels) >= 5 and labels[0].startswith("id 1..") and labels[-1].endswith("..")
    assert fetch_all(dst_url, "SELECT count(*) FROM backfill_validation WHERE status = 'fail'") == [(0,)]
