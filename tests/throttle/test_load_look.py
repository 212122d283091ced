"""The start gate's recent look (loadsignal.add_latency): one window per look_fresh_s per source, not per chunk.

Against the real server: a look kept in the baseline table by one chunk is used by the next chunk within
look_fresh_s when it said idle or well under the budget; a stale look, or one over the soft budget, makes the
chunk take its own window, and that window's look is kept for the next.
"""

from __future__ import annotations

import psycopg2
import pytest

from airflow_backfill_provider.throttle.loadsignal import add_latency, look_fresh_s, read_state, record_look
from airflow_backfill_provider.throttle.probe import probe_load
from tests.specs import make_spec


@pytest.fixture()
def look_spec(src_url, dst_url):
    return make_spec(src_url, dst_url, throttle={"max_latency_ratio": 2.0, "load_window_s": 1.0, "start_window_s": 0.3})


def _start(spec, src_url):
    conn = psycopg2.connect(src_url)
    conn.autocommit = True
    try:
        return add_latency(probe_load(conn), conn, spec, "backfill:look:test")
    finally:
        conn.close()


def _plant(dst_url, spec, ratio, *, age_s: float = 0.0):
    conn = psycopg2.connect(dst_url)
    try:
        _, _, has = read_state(conn, spec.throttle.baseline_table, spec.source_conn_id)
        record_look(conn, spec.throttle.baseline_table, spec.source_conn_id, ratio, has_columns=has)
        with conn.cursor() as cur:  # age it on the server's clock, which read_state measures with
            cur.execute(
                "UPDATE backfill_load_baseline SET look_at = look_at - make_interval(secs => %s) WHERE source_key = %s",
                (age_s, spec.source_conn_id),
            )
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("ratio", [None, 1.1], ids=["idle", "under-soft-budget"])
def test_a_fresh_calm_look_is_used_instead_of_a_window(look_spec, src_url, dst_url, ratio):
    _plant(dst_url, look_spec, ratio)
    sample = _start(look_spec, src_url)
    assert "reused_look_age_s" in (sample.window or {}), sample.window
    assert sample.latency_ratio == ratio


@pytest.mark.parametrize(
    "ratio, age",
    [(1.9, 0.0), (None, 10.0)],
    ids=["over-soft-budget", "stale"],
)
def test_otherwise_the_chunk_takes_its_own_window_and_keeps_its_look(look_spec, src_url, dst_url, ratio, age):
    assert age == 0.0 or age > look_fresh_s(look_spec.throttle)
    _plant(dst_url, look_spec, ratio, age_s=age)
    sample = _start(look_spec, src_url)
    assert "reused_look_age_s" not in (sample.window or {}), sample.window
    assert "window_s" in (sample.window or {}) or "samples" in str(sample.window)
    conn = psycopg2.connect(dst_url)
    try:
        _, look, _ = read_state(conn, look_spec.throttle.baseline_table, look_spec.source_conn_id)
    finally:
        conn.close()
    assert look is not None and look.age_s < look_fresh_s(look_spec.throttle)  # the new look is kept
    assert look.ratio == sample.latency_ratio


def test_the_first_chunk_ever_keeps_a_look_the_second_uses(look_spec, src_url, dst_url):
    first = _start(look_spec, src_url)  # no baseline table yet
    assert "reused_look_age_s" not in (first.window or {})
    second = _start(look_spec, src_url)
    calm = first.latency_ratio is None or first.latency_ratio <= 1.5
    assert ("reused_look_age_s" in (second.window or {})) == calm, (first, second)
