"""granularity: auto on a source table never analyzed: a bounded sample stands in for the statistics
(sourcestats.sample_stats) and gives the plan ANALYZE would give, without analyzing or writing the source.

Stated factor: the plan from the sample and the plan from ANALYZE's statistics have chunk counts within
1.25x of each other, and the same choice between key ranges and time chunks.
"""

from __future__ import annotations

import psycopg2
import pytest

from tests.conftest import fetch_all
from tests.seed import create_orders
from tests.specs import make_spec
from tests.conftest import plan_on

ROWS = 200_000
TARGET = 20_000
FACTOR = 1.25


def _seed(url: str, *, time_order: bool) -> None:
    """A TPC-H-orders-like table: ids in physical order; created_at over two years, scattered (random) or in
    physical order. Autovacuum is off for the table so nothing analyzes it behind the test's back."""
    conn = psycopg2.connect(url)
    create_orders(conn)
    created = (
        "'2022-01-01T00:00Z'::timestamptz + g * (interval '730 days' / %(rows)s)"
        if time_order
        else "'2022-01-01T00:00Z'::timestamptz + random() * interval '730 days'"
    )
    with conn.cursor() as cur:
        cur.execute("ALTER TABLE orders SET (autovacuum_enabled = false)")
        cur.execute(
            f"""INSERT INTO orders SELECT g, g %% 5000, 'new', 1, t, t, NULL
                  FROM (SELECT g, {created} AS t FROM generate_series(1, %(rows)s) g) x ORDER BY g""",
            {"rows": ROWS},
        )
        cur.execute("CREATE INDEX ON orders (created_at)")
    conn.commit()
    conn.close()


def _no_statistics(url: str) -> bool:
    """Never analyzed: no pg_stats rows (reltuples may be set: CREATE INDEX counts the rows it indexes)."""
    (analyzed, stats), = fetch_all(
        url,
        """SELECT coalesce(s.analyze_count + s.autoanalyze_count, 0),
                  (SELECT count(*) FROM pg_stats WHERE tablename = 'orders')
           FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.oid = 'orders'::regclass""",
    )  # fmt: skip
    return analyzed == 0 and stats == 0


def _count(plan) -> int:
    return len(plan.chunks)


@pytest.mark.parametrize("time_order, granularity", [(False, "key"), (True, "auto")])
def test_a_table_without_statistics_gets_the_plan_analyze_would_give(src_url, dst_url, pg, time_order, granularity):
    _seed(src_url, time_order=time_order)
    create_orders(pg(dst_url))
    spec = make_spec(src_url, dst_url, granularity="auto", target_chunk_rows=TARGET)
    assert _no_statistics(src_url)

    sampled = plan_on(spec, src_url, dst_url, "2022-01-01", "2024-01-01")
    note = [n for n in sampled.notes if "estimate was sampled" in n]
    assert note and "no statistics" in note[0] and "Run ANALYZE" in note[0], sampled.notes
    assert "created_at min/max from its index" in note[0]
    assert _no_statistics(src_url), "the plan must not analyze the source"

    pg(src_url).cursor().execute("ANALYZE orders")
    analyzed = plan_on(spec, src_url, dst_url, "2022-01-01", "2024-01-01")
    assert not any("estimate was sampled" in n for n in analyzed.notes)

    print(f"time_order={time_order}: sampled {_count(sampled)} chunks, analyzed {_count(analyzed)}; {note[0]}")
    assert sampled.granularity == analyzed.granularity == granularity, (sampled.notes, analyzed.notes)
    a, b = _count(sampled), _count(analyzed)
    assert max(a, b) <= FACTOR * min(a, b), (a, b)
    assert ROWS / TARGET / 2 <= a <= ROWS / TARGET * 2
    if granularity == "key":
        why = [n for n in sampled.notes if n.startswith("granularity auto chose key ranges of id")]
        assert why and "sampled correlation" in why[0], sampled.notes
        assert any("the sampled histogram of id" in n for n in sampled.notes), sampled.notes
    else:  # time chunks of the sample hold about the target, counted
        sizes = [
            fetch_all(
                src_url, "SELECT count(*) FROM orders WHERE created_at >= %s AND created_at < %s", (c.start, c.end)
            )[0][0]  # fmt: skip
            for c in sampled.chunks[:-1]
        ]
        assert all(TARGET / 3 <= s <= 2 * TARGET for s in sizes), sizes


def test_the_sample_is_bounded_and_leaves_the_session_as_it_was(src_url, pg):
    """At most SAMPLE_PAGES pages (plus sampling noise), the session's settings unchanged, no transaction left."""
    from airflow_backfill_provider.plan import sourcestats
    from airflow_backfill_provider.core.spec import TableName

    _seed(src_url, time_order=False)
    conn = psycopg2.connect(src_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = '30s'")
        conn.commit()
        s = sourcestats.sample_stats(conn, TableName.parse("orders"), "created_at", "id", timezone="UTC",
                                     time_indexed=True)  # fmt: skip
        assert s is not None
        assert s.table.pages > 4 * sourcestats.SAMPLE_PAGES  # the table is bigger than the sample
        assert s.sampled_pages <= 1.5 * sourcestats.SAMPLE_PAGES
        assert abs(s.table.rows - ROWS) <= 0.15 * ROWS
        assert abs(s.time.correlation) < 0.2 and s.key.correlation > 0.9
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "30s"
    finally:
        conn.close()


def test_a_sample_that_cannot_finish_in_time_falls_back_to_days(src_url, dst_url, pg, monkeypatch):
    """The sample waits at most SAMPLE_TIMEOUT_MS (here for a lock DDL holds): then the plan falls back to
    calendar days and says so, as it did before sampling existed."""
    from airflow_backfill_provider.plan import sourcestats

    _seed(src_url, time_order=False)
    create_orders(pg(dst_url))
    monkeypatch.setattr(sourcestats, "SAMPLE_TIMEOUT_MS", 300)
    blocker = psycopg2.connect(src_url)
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")  # as an ALTER TABLE would
        spec = make_spec(src_url, dst_url, granularity="auto", target_chunk_rows=TARGET)
        plan = plan_on(spec, src_url, dst_url, "2022-01-01", "2022-01-08")
    finally:
        blocker.rollback()
        blocker.close()
    assert plan.granularity == "day" and len(plan.chunks) == 7, plan.notes
    assert any("no usable sample" in n and "ANALYZE" in n for n in plan.notes), plan.notes
