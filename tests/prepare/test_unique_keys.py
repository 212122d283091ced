"""The destination's unique key must make reruns idempotent, or the load is refused before any write.

Issue 12 item 3 (a nullable unique key duplicated rows on every rerun: 100 -> 125 -> 150, live ingest
too) and item 14 (a covering index ``UNIQUE (id) INCLUDE (amount)`` was refused; partial, expression
and deferrable indexes cannot be ON CONFLICT arbiters).
"""

import pytest

from airflow_backfill_provider.core.chunks import plan_chunks
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.live import run_live_ingest
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import fetch_all
from tests.specs import table_spec

DAYS = plan_chunks("2024-01-01", "2024-01-03", "day", "UTC")
COLUMNS = "tenant_id int, id int NOT NULL, amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL"


def seed(src, *, null_tenants: int):
    """100 rows over 2 days; the first ``null_tenants`` ids have tenant_id NULL."""
    src.cursor().execute(
        f"CREATE TABLE ev ({COLUMNS});"
        "INSERT INTO ev SELECT CASE WHEN g <= %s THEN NULL ELSE g %% 3 END, g, g / 10.0,"
        " '2024-01-01Z'::timestamptz + g * interval '25 minutes', '2024-01-01Z'::timestamptz + g * interval '25 minutes'"
        " FROM generate_series(1, 100) g",
        (null_tenants,),
    )


def make_spec(src_url, dst_url, keys):
    """ev keyed by ``keys``, versioned, with live ingest whose look-back re-reads every row on a rerun."""
    live = {"enabled": True, "start_from": "2023-12-31T00:00:00Z", "lookback_s": 10 * 86400}
    return table_spec(
        src_url, dst_url, "ev", time_column="created_at", version_column="updated_at", key_columns=keys, live=live
    )


def nothing_written(dst_url):
    return fetch_all(
        dst_url,
        "SELECT (SELECT count(*) FROM ev), to_regclass('backfill_ledger'), to_regclass('backfill_watermarks')",
    ) == [(0, None, None)]


def count(dst_url):
    return fetch_all(dst_url, "SELECT count(*) FROM ev")[0][0]


# destination key DDL -> (source NULL tenant ids, refused with these fragments | None: loads exactly)
COMPOSITE = {
    "nullable unique": (
        "UNIQUE (tenant_id, id)",
        25,
        ("['tenant_id']", "allow NULL", "ev_tenant_id_id_key", "SET NOT NULL", "NULLS NOT DISTINCT"),
    ),
    "not null unique": ("UNIQUE (tenant_id, id)", 0, None),
    "nulls not distinct": ("UNIQUE NULLS NOT DISTINCT (tenant_id, id)", 25, None),
}


@pytest.mark.parametrize("case", sorted(COMPOSITE))
@pytest.mark.parametrize("path", ["backfill", "live"])
def test_a_nullable_key_is_refused_before_any_write(case, path, src_url, dst_url, pg):
    ddl, null_tenants, refused = COMPOSITE[case]
    seed(pg(src_url), null_tenants=null_tenants)
    columns = COLUMNS.replace("tenant_id int", "tenant_id int NOT NULL") if case == "not null unique" else COLUMNS
    pg(dst_url).cursor().execute(f"CREATE TABLE ev ({columns}, {ddl})")
    spec = make_spec(src_url, dst_url, ["tenant_id", "id"])

    def run():
        if path == "backfill":
            return sum(transfer_chunk(spec, c).rows_extracted for c in DAYS)
        return run_live_ingest(spec).rows_extracted

    if refused:
        for _ in range(3):  # before the fix: 100, 125, 150 rows
            with pytest.raises(PermanentChunkError) as info:
                run()
            for fragment in refused:
                assert fragment in str(info.value)
            assert nothing_written(dst_url)
        return
    for _ in range(3):
        assert run() == 100
        assert count(dst_url) == 100
    assert fetch_all(dst_url, "SELECT count(*) FROM ev WHERE tenant_id IS NULL")[0][0] == null_tenants


# key_columns [id]; destination key DDL -> refused with these fragments | None: loads exactly
SINGLE = {
    "covering unique (INCLUDE)": ("CONSTRAINT ev_id UNIQUE (id) INCLUDE (amount)", None),
    "covering primary key (INCLUDE)": ("PRIMARY KEY (id) INCLUDE (amount, created_at)", None),
    "full unique next to a partial one": ("UNIQUE (id); CREATE UNIQUE INDEX ev_pos ON ev (id) WHERE amount > 5", None),
    "partial unique only": (
        "CHECK (true); CREATE UNIQUE INDEX ev_pos ON ev (id) WHERE amount > 5",
        ("'ev_pos' is partial",),
    ),
    "expression unique only": (
        "CHECK (true); CREATE UNIQUE INDEX ev_expr ON ev ((id + 0))",
        ("'ev_expr' is on an expression",),
    ),
    "deferrable unique": (
        "CONSTRAINT ev_def UNIQUE (id) DEFERRABLE INITIALLY IMMEDIATE",
        ("'ev_def'", "DEFERRABLE", "ALTER CONSTRAINT ev_def NOT DEFERRABLE"),
    ),
    "deferrable next to an immediate one": (
        "CONSTRAINT ev_def UNIQUE (id) DEFERRABLE; CREATE UNIQUE INDEX ev_imm ON ev (id)",
        ("'ev_def'", "DEFERRABLE"),
    ),
}


@pytest.mark.parametrize("case", sorted(SINGLE))
def test_which_unique_indexes_can_be_the_arbiter(case, src_url, dst_url, pg):
    ddl, refused = SINGLE[case]
    seed(pg(src_url), null_tenants=0)
    table_ddl, _, extra = ddl.partition(";")
    pg(dst_url).cursor().execute(f"CREATE TABLE ev ({COLUMNS}, {table_ddl}); {extra}")
    spec = make_spec(src_url, dst_url, ["id"])
    if refused:
        with pytest.raises(PermanentChunkError) as info:
            transfer_chunk(spec, DAYS[0])
        for fragment in refused:
            assert fragment in str(info.value)
        assert nothing_written(dst_url)
        return
    assert sum(transfer_chunk(spec, c).inserted for c in DAYS) == 100
    assert sum(transfer_chunk(spec, c).unchanged for c in DAYS) == 100  # rerun: nothing rewritten
    assert count(dst_url) == 100
