"""Live ingest on real PostgreSQL: watermark advance, lookback, never backwards, atomic with its rows."""

import datetime as dt
import os

import pytest

from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.live import advance_watermark, run_live_ingest
from airflow_backfill_provider.core.spec import TableName, load_spec
from tests import specs
from tests.conftest import fetch_all, table_digest

WM = "SELECT watermark FROM backfill_watermarks WHERE target_table = 'public.orders'"


def make_spec(src_url, dst_url, **live):
    """Live ingest on, a minute of look-back unless the test says otherwise."""
    return specs.make_spec(src_url, dst_url, live={"enabled": True, "lookback_s": 60, **live})


@pytest.fixture()
def seeded(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=500, days=5, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    return src_url, dst_url


def watermark(dst):
    rows = fetch_all(dst, WM)
    return rows[0][0] if rows else None


def touch(src, pg, ids, delta="0 seconds", **sets):
    """Update source rows as an application would: new content, updated_at = now() + delta."""
    cur = pg(src).cursor()
    cur.execute(
        "UPDATE orders SET status = %s, updated_at = now() + %s::interval WHERE id = ANY(%s) RETURNING updated_at",
        (sets.get("status", "changed"), delta, list(ids)),
    )
    return max(r[0] for r in cur.fetchall())


def same_rows(src, dst, ids):
    q = "SELECT t::text FROM orders t WHERE id = ANY(%s) ORDER BY id"
    return fetch_all(src, q, (list(ids),)) == fetch_all(dst, q, (list(ids),))


def test_first_run_starts_at_the_source_clock_and_loads_nothing_old(seeded):
    src, dst = seeded
    before = fetch_all(src, "SELECT now()")[0][0]
    result = run_live_ingest(make_spec(src, dst))
    assert result.previous_watermark is None
    assert result.rows_extracted == 0  # history (2024) is the backfill's job, not live ingest's
    assert watermark(dst) >= before
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(0,)]


def test_start_from_makes_the_first_run_read_from_there(seeded):
    src, dst = seeded
    spec = make_spec(src, dst, start_from="2024-01-05T00:00:00+00:00", lookback_s=0)
    result = run_live_ingest(spec)
    expected = fetch_all(
        src, "SELECT count(*), max(updated_at) FROM orders WHERE updated_at > '2024-01-05T00:00:00+00'"
    )[0]
    assert result.rows_extracted == result.inserted == expected[0] > 0
    assert watermark(dst) == expected[1]


def test_watermark_advances_to_the_highest_version_loaded(seeded, pg):
    src, dst = seeded
    spec = make_spec(src, dst)
    run_live_ingest(spec)
    w0 = watermark(dst)
    newest = touch(src, pg, [1, 2, 3], delta="1 second")
    result = run_live_ingest(spec)
    assert (result.inserted, result.updated) == (3, 0)
    assert watermark(dst) == newest > w0
    assert same_rows(src, dst, [1, 2, 3])
    # updated again: newer wins in the destination, the watermark follows
    newest2 = touch(src, pg, [2], delta="2 seconds", status="again")
    result = run_live_ingest(spec)
    assert result.updated == 1 and result.unchanged == 2  # 1 and 3 re-read inside the lookback, not rewritten
    assert watermark(dst) == newest2
    assert same_rows(src, dst, [1, 2, 3])


def test_lookback_catches_a_late_commit_and_rereads_are_free(seeded, pg):
    src, dst = seeded
    spec = make_spec(src, dst, lookback_s=60)
    run_live_ingest(spec)
    touch(src, pg, [10], delta="1 second")
    run_live_ingest(spec)
    w = watermark(dst)
    xmin_10 = fetch_all(dst, "SELECT xmin::text FROM orders WHERE id = 10")
    # a source transaction that stamped its row 30 s before the watermark but committed only now
    s = pg(src).cursor()
    s.execute("UPDATE orders SET status = 'late', updated_at = %s WHERE id = 20", (w - dt.timedelta(seconds=30),))
    # and one stamped 10 minutes before: older than the lookback covers (the documented limit)
    s.execute("UPDATE orders SET status = 'too-late', updated_at = %s WHERE id = 30", (w - dt.timedelta(minutes=10),))
    result = run_live_ingest(spec)
    assert result.inserted == 1 and result.unchanged == 1  # id 20 new; id 10 re-read, unchanged
    assert same_rows(src, dst, [10, 20])
    assert fetch_all(dst, "SELECT count(*) FROM orders WHERE id = 30") == [(0,)]
    assert fetch_all(dst, "SELECT xmin::text FROM orders WHERE id = 10") == xmin_10  # not rewritten
    assert watermark(dst) == w  # nothing newer than w was seen


def test_watermark_never_moves_backwards(seeded, pg):
    src, dst = seeded
    spec = make_spec(src, dst, lookback_s=7200)
    run_live_ingest(spec)
    top = touch(src, pg, [1], delta="1 hour")  # a row stamped in the future pushes the watermark up
    run_live_ingest(spec)
    assert watermark(dst) == top
    row_before = fetch_all(dst, "SELECT t::text, xmin::text FROM backfill_watermarks t")
    touch(src, pg, [1, 2], delta="-10 minutes")  # rows stamped below the watermark (inside the lookback)
    result = run_live_ingest(spec)
    assert result.rows_extracted == 2  # read, loaded (2 is new; 1 keeps its higher version: newer wins) ...
    assert watermark(dst) == top
    assert fetch_all(dst, "SELECT t::text, xmin::text FROM backfill_watermarks t") == row_before  # not even rewritten
    # the writer itself refuses to go back, whatever it is given
    conn = pg(dst)
    conn.autocommit = False
    with conn.cursor() as cur:
        assert (
            advance_watermark(
                cur, TableName.parse("public.backfill_watermarks"), "public.orders", top - dt.timedelta(days=1)
            )
            == top
        )
    conn.commit()
    assert watermark(dst) == top


def test_failed_run_moves_neither_rows_nor_watermark(seeded, pg):
    src, dst = seeded
    spec = make_spec(src, dst)
    run_live_ingest(spec)
    w0 = watermark(dst)
    touch(src, pg, [1, 2, 3], delta="1 second")
    pg(dst).cursor().execute(
        """CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.id = 3 THEN RAISE EXCEPTION 'injected failure on id 3'; END IF; RETURN NEW; END $$;
           CREATE TRIGGER boom BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION boom();"""
    )
    with pytest.raises(Exception, match="injected failure"):
        run_live_ingest(spec)
    assert watermark(dst) == w0
    assert fetch_all(dst, "SELECT count(*) FROM orders") == [(0,)]
    pg(dst).cursor().execute("DROP TRIGGER boom ON orders")
    assert run_live_ingest(spec).inserted == 3
    assert same_rows(src, dst, [1, 2, 3]) and watermark(dst) > w0


def test_live_catches_up_everything_after_start_from(seeded, pg):
    """From an early start_from, repeated runs converge to an exact copy of the source."""
    src, dst = seeded
    spec = make_spec(src, dst, start_from="2020-01-01T00:00:00+00:00")
    run_live_ingest(spec)
    touch(src, pg, range(1, 50), delta="1 second")
    run_live_ingest(spec)
    assert table_digest(src) == table_digest(dst)


def test_live_dag_built_from_the_same_yaml_runs_under_airflow(seeded, pg, airflow_db, monkeypatch):
    """dags/live_dags.py builds live_orders from dags/configs/orders.yaml; one real task run via dag.test()."""
    src, dst = seeded
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_SOURCE_PG", src)
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_DEST_PG", dst)
    from airflow_backfill_provider.live_factory import register_live

    dags = register_live(
        os.path.join(os.path.dirname(os.path.dirname(__file__)), "..", "dags", "configs"), {}, strict=True
    ).dags
    dag = dags["live_orders"]
    assert [t.task_id for t in dag.tasks] == ["live_ingest"]
    assert dag.max_active_runs == 1
    run_live_ingest(load_spec({**dag.tasks[0].spec, "source_conn_id": src, "destination_conn_id": dst}))
    touch(src, pg, [7, 8], delta="1 second")
    dr = dag.test()
    assert str(getattr(dr.state, "value", dr.state)) == "success"
    assert same_rows(src, dst, [7, 8])
