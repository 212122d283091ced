"""The ledger, the chunk lock and the watermark are keyed by what a backfill IS, not by how a spec spells it.

Issue 12 item 2 (two sources into one destination: the second was skipped entirely) and "also seen"
(`orders` and `public.orders` missed each other's ledger rows and watermark).
"""

import datetime as dt

import psycopg2
import pytest
from psycopg2 import sql

from airflow_backfill_provider.ledger import table as ledger
from airflow_backfill_provider.prepare import identity
from airflow_backfill_provider.core.chunks import plan_chunks
from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.core.exceptions import PermanentChunkError, TransientChunkError
from airflow_backfill_provider.live import run_live_ingest
from airflow_backfill_provider.plan.planning import build_plan
from airflow_backfill_provider.core.spec import TableName
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from airflow_backfill_provider.prepare.watermark import WATERMARK_COLUMNS
from tests.conftest import fetch_all
from tests.specs import make_spec
from tests.ledger.test_ledger_ranges import OLD_LEDGER

DAYS = plan_chunks("2024-01-01", "2024-01-04", "day", "UTC")


def load_all(spec):
    return sum(transfer_chunk(spec, c).inserted for c in DAYS)


def count(url, table="orders"):
    return fetch_all(url, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))[0][0]


def test_two_sources_into_one_destination_both_load_everything(src_url, dst_url, pg):
    src = pg(src_url)
    seed_orders(src, rows=300, days=3, start=dt.date(2024, 1, 1), table="orders_us", first_id=1)
    seed_orders(src, rows=200, days=3, start=dt.date(2024, 1, 1), table="orders_eu", first_id=10_001)
    create_orders(pg(dst_url))
    us = make_spec(src_url, dst_url, name="us", source_table="orders_us")
    eu = make_spec(src_url, dst_url, name="eu", source_table="orders_eu")
    assert load_all(us) == 300
    plan = build_plan(eu, "2024-01-01", "2024-01-04", dst_conn=pg(dst_url))
    assert (len(plan.chunks), len(plan.skipped)) == (3, 0)  # before the fix: 0 chunks, 3 skipped
    assert load_all(eu) == 200
    assert count(dst_url) == 500
    for spec in (us, eu):  # each backfill now sees its own chunks done
        plan = build_plan(spec, "2024-01-01", "2024-01-04", dst_conn=pg(dst_url))
        assert (len(plan.chunks), len(plan.skipped)) == (0, 3)
    keys = fetch_all(dst_url, "SELECT DISTINCT target_table, backfill->>'source' FROM backfill_ledger ORDER BY 2")
    assert keys == [("public.orders", "public.orders_eu"), ("public.orders", "public.orders_us")]


# what a second spec changes; True: it is another backfill (loads every range), False: the same one (skips)
VARIANTS = {
    "source table": (True, lambda w: {"source_table": "orders_copy"}),
    "source database": (True, lambda w: {"source_conn_id": w["other_src"]}),
    "time column": (True, lambda w: {"time_column": "updated_at"}),
    "timezone": (True, lambda w: {"timezone": "America/New_York"}),
    "historical range": (True, lambda w: {"historical": [{"until": "2024-01-02", "source_table": "orders_copy"}]}),
    "historical expression": (
        True,
        lambda w: {"historical": [{"until": "2024-01-02", "column_expressions": {"note": "upper(note)"}}]},
    ),
    "destination spelled without schema": (False, lambda w: {"destination_table": "orders"}),
    "source spelled with schema": (False, lambda w: {"source_table": "public.orders"}),
    "spec name and dag_id": (False, lambda w: {"name": "renamed", "dag_id": "another_dag"}),
    "another conn string, same database": (False, lambda w: {"source_conn_id": w["src"] + "?application_name=x"}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_what_makes_a_backfill_another_one(variant, src_url, dst_url, databases, pg):
    other_src = databases.create("src2") if variant == "source database" else None
    for url in filter(None, (src_url, other_src)):
        seed_orders(pg(url), rows=300, days=3, start=dt.date(2024, 1, 1))
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2024, 1, 1), table="orders_copy")
    create_orders(pg(dst_url))
    first = make_spec(src_url, dst_url)
    load_all(first)
    another, change = VARIANTS[variant]
    second = make_spec(src_url, dst_url, **change({"src": src_url, "other_src": other_src}))
    plan = build_plan(second, "2024-01-01", "2024-01-04", dst_conn=pg(dst_url))
    assert len(plan.skipped) == (0 if another else 3), plan.notes
    # and the chunk writes the same key the plan reads: a loaded second backfill skips its own chunks
    for chunk in plan.chunks:
        transfer_chunk(second, chunk)
    assert build_plan(second, "2024-01-01", "2024-01-04", dst_conn=pg(dst_url)).chunks == []


def test_a_source_views_definition_is_part_of_the_identity_a_tables_is_not(src_url, dst_url, pg):
    """A view redefined with the same columns is another selection of rows: its ranges are loaded again and the
    plan says why. A table source's description has no definition (its ledger keys stay what they were)."""
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    view = "CREATE OR REPLACE VIEW orders_v AS SELECT * FROM orders WHERE {cond}"
    pg(src_url).cursor().execute(view.format(cond="true"))
    table_spec = make_spec(src_url, dst_url)
    view_spec = make_spec(src_url, dst_url, source_table="orders_v")
    src, dst = pg(src_url), pg(dst_url)
    assert "source_definitions" not in identity.of(table_spec, src, dst).description
    before = identity.of(view_spec, src, dst)
    assert list(before.description["source_definitions"]) == ["public.orders_v"]
    assert identity.of(view_spec, src, dst).key == before.key  # stable while nothing changes
    load_all(view_spec)
    pg(src_url).cursor().execute(view.format(cond="id % 2 = 0"))
    after = identity.of(view_spec, src, dst)
    assert after.key != before.key
    why = identity.explain(before.description, after.description)
    assert why is not None and "public.orders_v" in why and "redefined" in why, why
    plan = build_plan(view_spec, "2024-01-01", "2024-01-04", dst_conn=dst)
    assert (len(plan.chunks), len(plan.skipped)) == (3, 0)
    assert any("redefined" in note for note in plan.notes), plan.notes


def test_chunk_lock_serializes_one_backfill_not_two(src_url, dst_url, pg):
    src = pg(src_url)
    seed_orders(src, rows=300, days=3, start=dt.date(2024, 1, 1), table="orders_us", first_id=1)
    seed_orders(src, rows=200, days=3, start=dt.date(2024, 1, 1), table="orders_eu", first_id=10_001)
    create_orders(pg(dst_url))
    us = make_spec(src_url, dst_url, name="us", source_table="orders_us", lock_timeout_s=1)
    eu = make_spec(src_url, dst_url, name="eu", source_table="orders_eu", lock_timeout_s=1)
    day = DAYS[0]
    gate = psycopg2.connect(dst_url)
    try:
        with gate.cursor() as cur:  # hold us's chunk lock, as a running us chunk would
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (identity.of(us, pg(src_url), gate).lock_key(day.start, day.end),),
            )
        assert transfer_chunk(eu, day).inserted == 67  # another backfill: not blocked
        with pytest.raises(TransientChunkError, match="lock"):
            transfer_chunk(us, day)  # the same backfill and range: waits, here up to lock_timeout
    finally:
        gate.close()
    assert transfer_chunk(us, day).inserted == 100


def test_a_previous_release_ledger_is_migrated_in_place_and_its_rows_count_for_no_backfill(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=300, days=3, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    dst = pg(dst_url)
    with dst.cursor() as cur:
        cur.execute(OLD_LEDGER)
        for c in DAYS:
            cur.execute(
                "INSERT INTO backfill_ledger VALUES ('public.orders', %s, %s, %s, 100, 100, 0, 0, 1.0, 'd', 'r')",
                (c.start, c.end, c.chunk_id),
            )
    spec = make_spec(src_url, dst_url)
    # not trusted: those rows say "some backfill loaded public.orders", not which one
    assert len(build_plan(spec, "2024-01-01", "2024-01-04", dst_conn=dst).chunks) == 3
    assert transfer_chunk(spec, DAYS[0]).inserted == 100  # migrates the ledger
    # after the migration the old rows of the other two days still count for nothing
    assert build_plan(spec, "2024-01-01", "2024-01-04", dst_conn=dst).chunks == DAYS[1:]
    assert sum(transfer_chunk(spec, c).inserted for c in DAYS[1:]) == 200
    assert build_plan(spec, "2024-01-01", "2024-01-04", dst_conn=dst).chunks == []
    rows = fetch_all(dst_url, "SELECT backfill_key = '', count(*) FROM backfill_ledger GROUP BY 1 ORDER BY 1")
    assert rows == [(False, 3), (True, 3)]  # old rows kept (history), new rows keyed
    pk = fetch_all(
        dst_url,
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'backfill_ledger'::regclass AND contype = 'p'",
    )
    assert pk == [("PRIMARY KEY (target_table, backfill_key, range_start, range_end, key_lo, key_hi)",)]
    ledger.ensure_table(dst, TableName.parse("public.backfill_ledger"))  # idempotent


def test_orders_and_public_orders_share_ledger_and_watermark(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=500, days=5, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    bare = make_spec(
        src_url,
        dst_url,
        destination_table="orders",
        source_table="orders",
        live={"enabled": True, "start_from": "2024-01-04T00:00:00Z", "lookback_s": 0},
    )
    qualified = make_spec(src_url, dst_url, name="q", destination_table="public.orders", source_table="public.orders")
    for c in DAYS[:2]:
        transfer_chunk(bare, c)
    run_live_ingest(bare)  # writes the watermark, keyed by the resolved relation
    assert fetch_all(dst_url, "SELECT target_table, source LIKE 'sysid:%|public.orders' FROM backfill_watermarks") == [
        ("public.orders", True)
    ]
    plan = build_plan(qualified, "2024-01-01", "2024-01-10", dst_conn=pg(dst_url))
    assert plan.clipped and plan.watermark is not None  # the watermark is found
    assert [c.chunk_id for c in plan.skipped] == ["2024-01-01", "2024-01-02"]  # the ledger rows too
    # the other way round: qualified loads, bare skips
    transfer_chunk(qualified, plan.chunks[0])
    assert build_plan(bare, "2024-01-01", "2024-01-04", dst_conn=pg(dst_url)).chunks == []


def test_a_watermark_row_of_the_previous_release_is_read_and_rekeyed_not_restarted(src_url, dst_url, pg):
    seed_orders(pg(src_url), rows=500, days=5, start=dt.date(2024, 1, 1))
    create_orders(pg(dst_url))
    with pg(dst_url).cursor() as cur:  # the previous release keyed it by the spelling: 'orders'
        cur.execute(sql.SQL("CREATE TABLE backfill_watermarks ({})").format(sql.SQL(WATERMARK_COLUMNS)))
        cur.execute("INSERT INTO backfill_watermarks (target_table, watermark) VALUES ('orders', '2024-01-04T00:00Z')")
    bare = make_spec(src_url, dst_url, destination_table="orders", live={"enabled": True, "lookback_s": 0})
    plan = build_plan(bare, "2024-01-01", "2024-01-10", dst_conn=pg(dst_url))
    assert plan.clipped and plan.end == dt.datetime(2024, 1, 4, tzinfo=dt.timezone.utc)
    result = run_live_ingest(bare)  # continues from the stored watermark (not from now(): no gap)
    assert result.previous_watermark.startswith("2024-01-04")
    assert (
        result.rows_extracted
        == fetch_all(src_url, "SELECT count(*) FROM orders WHERE updated_at > '2024-01-04Z'")[0][0]
    )
    assert fetch_all(dst_url, "SELECT target_table, source LIKE 'sysid:%|public.orders' FROM backfill_watermarks") == [
        ("public.orders", True)
    ]


def test_a_second_live_ingest_from_another_source_is_refused_not_silently_skipping(src_url, dst_url, pg):
    """One watermark per table: live ingest from orders_us moving it would make live ingest from orders_eu skip rows."""
    src = pg(src_url)
    seed_orders(src, rows=300, days=3, start=dt.date(2024, 1, 1), table="orders_us", first_id=1)
    seed_orders(src, rows=200, days=3, start=dt.date(2024, 1, 2), table="orders_eu", first_id=10_001)
    create_orders(pg(dst_url))
    live = {"enabled": True, "start_from": "2023-12-31T00:00:00Z", "lookback_s": 0}
    us = make_spec(src_url, dst_url, name="us", source_table="orders_us", live=live)
    eu = make_spec(src_url, dst_url, name="eu", source_table="orders_eu", live=live)
    assert run_live_ingest(us).rows_extracted == 300
    before = fetch_all(dst_url, "SELECT t::text, xmin::text FROM backfill_watermarks t")
    with pytest.raises(PermanentChunkError, match="belongs to live ingest from .*orders_us.* watermark table"):
        run_live_ingest(eu)  # before the fix: read eu rows above us's watermark only, 0 of 200
    assert fetch_all(dst_url, "SELECT t::text, xmin::text FROM backfill_watermarks t") == before
    assert count(dst_url) == 300
    # the fix it names: a watermark table per source
    eu_own = make_spec(
        src_url, dst_url, name="eu", source_table="orders_eu", live=live, watermark={"table": "public.eu_watermarks"}
    )
    assert run_live_ingest(eu_own).rows_extracted == 200
    assert run_live_ingest(us).rows_extracted == 0  # us still runs on its own
    assert count(dst_url) == 500


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"time_column": "updated_at"},
        {"timezone": "America/New_York"},
        {"source_table": "orders_eu"},
        {"destination_table": "orders_copy"},
        {"historical": [{"until": "2024-01-02", "source_table": "orders_eu"}]},
    ],
)
def test_the_plan_prepares_the_run_once_and_a_changed_spec_prepares_it_again(change, src_url, dst_url, pg):
    """Chunks use the prepared run the plan put in their descriptor (identity and catalog facts, after one
    fingerprint statement per side) only while it was made for their spec; otherwise (spec changed since the
    plan, descriptor without one, another release's record) they prepare it themselves."""
    import json

    from airflow_backfill_provider.prepare import facts
    from airflow_backfill_provider.core.chunks import Chunk

    src = pg(src_url)
    seed_orders(src, rows=90, days=3, start=dt.date(2024, 1, 1), table="orders", first_id=1)
    seed_orders(src, rows=30, days=3, start=dt.date(2024, 1, 1), table="orders_eu", first_id=10_001)
    create_orders(pg(dst_url))
    create_orders(pg(dst_url), table="orders_copy")
    planned = make_spec(src_url, dst_url)
    s, d = psycopg2.connect(src_url), psycopg2.connect(dst_url)
    try:
        prepared = facts.prepare_run(planned, s, d, DAYS)
        # through JSON, as XCom stores them
        descriptors = json.loads(
            json.dumps(prepared.attach([c.to_descriptor() for c in DAYS] + [{"chunk_id": "b", "batch": {}}]))
        )
        running = make_spec(src_url, dst_url, **change)
        fresh = identity.of(running, s, d)
    finally:
        s.close()
        d.close()
    got = [facts.PreparedRun.of_descriptor(desc) for desc in descriptors]  # a batch carries it too
    assert all(g is not None and g.backfill == prepared.backfill for g in got)
    if change:
        assert fresh.key != prepared.backfill.key
    else:
        assert fresh == prepared.backfill
    assert facts.PreparedRun.of_descriptor(DAYS[0].to_descriptor()) is None
    assert facts.PreparedRun.of_descriptor({**descriptors[0], "prep": "z1:!!"}) is None  # damaged
    assert facts.PreparedRun.of_descriptor({**descriptors[0], "prep": {"v": facts.VERSION}}) is None
    # whichever way it came, the chunk records itself under the identity of the spec it ran with
    for desc in descriptors[:-1]:
        transfer_chunk(running, Chunk.from_descriptor(desc), prepared=facts.PreparedRun.of_descriptor(desc))
    keys = fetch_all(dst_url, "SELECT DISTINCT backfill_key FROM backfill_ledger")
    assert keys == [(fresh.key,)]
