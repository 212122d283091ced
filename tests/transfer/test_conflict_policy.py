"""Tables without a version column: conflict_policy live_wins (DO NOTHING, default) or backfill_wins."""

import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.core.exceptions import SpecError
from airflow_backfill_provider.live import run_live_ingest
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all
from tests.specs import table_spec

EVENTS = """CREATE TABLE events (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, kind text NOT NULL, payload jsonb)"""
SEED = """INSERT INTO events SELECT g, '2024-01-01'::timestamptz + g * interval '10 minutes', 'k' || (g % 3),
          jsonb_build_object('n', g) FROM generate_series(0, 431) g"""  # 432 events: 2024-01-01 .. 01-03 (3 days)


def make_spec(src, dst, **extra):
    return table_spec(src, dst, "events", time_column="created_at", **extra)


@pytest.fixture()
def tables(src_url, dst_url, pg):
    s, d = pg(src_url).cursor(), pg(dst_url).cursor()
    s.execute(EVENTS)
    s.execute(SEED)
    d.execute(EVENTS)
    return src_url, dst_url


def load_all(spec, start="2024-01-01", end="2024-01-04"):
    results = [transfer_chunk(spec, c) for c in plan_chunks(start, end, "day", "UTC")]
    return sum(r.inserted for r in results), sum(r.updated for r in results), sum(r.unchanged for r in results)


def kinds(dst, ids):
    return dict(fetch_all(dst, "SELECT id, kind FROM events WHERE id = ANY(%s)", (list(ids),)))


def live_rows(dst, pg):
    """What live ingest wrote meanwhile: newer content for 3 keys the backfill also reads, and one new key."""
    pg(dst).cursor().execute(
        """INSERT INTO events VALUES (5, '2024-01-01 00:50+00', 'live', '{"n": 5}'),
                                     (6, '2024-01-01 01:00+00', 'live', '{"n": 6}'),
                                     (7, '2024-01-01 01:10+00', 'k1', '{"n": 7}')"""  # 7: same as the source
    )


def test_spec_default_is_live_wins_and_the_choices_are_named(src_url, dst_url):
    assert make_spec(src_url, dst_url).conflict_policy == "live_wins"
    with pytest.raises(SpecError, match=r"conflict_policy.*'live_wins' or 'backfill_wins'"):
        make_spec(src_url, dst_url, conflict_policy="newest")


def test_live_wins_never_touches_a_row_already_there(tables, pg):
    src, dst = tables
    live_rows(dst, pg)
    xmins = fetch_all(dst, "SELECT id, xmin::text FROM events ORDER BY id")
    inserted, updated, unchanged = load_all(make_spec(src, dst))
    assert (inserted, updated, unchanged) == (429, 0, 3)
    assert kinds(dst, [5, 6, 7]) == {5: "live", 6: "live", 7: "k1"}
    assert fetch_all(dst, "SELECT id, xmin::text FROM events WHERE id IN (5, 6, 7) ORDER BY id") == xmins
    # a rerun writes nothing at all
    assert load_all(make_spec(src, dst)) == (0, 0, 432)


def test_backfill_wins_overwrites_rows_that_differ_and_only_those(tables, pg):
    src, dst = tables
    live_rows(dst, pg)
    xmin_7 = fetch_all(dst, "SELECT xmin::text FROM events WHERE id = 7")
    inserted, updated, unchanged = load_all(make_spec(src, dst, conflict_policy="backfill_wins"))
    assert (inserted, updated, unchanged) == (429, 2, 1)
    assert kinds(dst, [5, 6, 7]) == {5: "k2", 6: "k0", 7: "k1"}
    assert fetch_all(dst, "SELECT xmin::text FROM events WHERE id = 7") == xmin_7  # identical: not rewritten
    assert fetch_all(src, "SELECT count(*), md5(string_agg(e::text, '|' ORDER BY id)) FROM events e") == fetch_all(
        dst, "SELECT count(*), md5(string_agg(e::text, '|' ORDER BY id)) FROM events e"
    )
    assert load_all(make_spec(src, dst, conflict_policy="backfill_wins")) == (0, 0, 432)


def test_live_ingest_without_version_column_reads_by_time_and_overwrites(tables, pg):
    """Live ingest's rows are the latest by definition: it overwrites what differs, under either policy."""
    src, dst = tables
    spec = make_spec(src, dst, live={"enabled": True, "start_from": "2024-01-03T00:00:00+00:00", "lookback_s": 86400})
    assert spec.live_cursor_column == "created_at"
    load_all(spec, end="2024-01-03")  # the backfill's part (clipping is covered in test_watermark_rule)
    pg(dst).cursor().execute("INSERT INTO events VALUES (400, '2024-01-03 18:40+00', 'stale', NULL)")
    result = run_live_ingest(spec)  # reads created_at > 2024-01-02 (start_from minus the 1-day lookback)
    assert result.rows_extracted == 288 - 1  # 2024-01-02 00:10 .. 01-03 23:50 (strictly after the bound)
    assert result.updated == 1 and result.inserted == 143  # 400 overwritten; 01-03's other rows new
    assert kinds(dst, [400]) == {400: "k1"}
    assert fetch_all(dst, "SELECT count(*) FROM events") == [(432,)]
