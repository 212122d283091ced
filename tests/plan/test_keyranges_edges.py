"""Key ranges (chunk_by: key) at their edges, on real PostgreSQL (corr brief, gap 4).

Every row exactly once for keys at bigint's minimum and maximum, smallint and integer keys with huge gaps,
a key column that is not the unique key and holds NULLs, a historical range whose key is an expression,
and (property) random key sets; keys that are not integers are refused at plan time, before any write.
"""

from __future__ import annotations

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql

from airflow_backfill_provider.core.exceptions import PlanError, SpecError
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import plan_on
from tests.session_helpers import run_sql
from tests.specs import table_spec

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1


def _table(key_type: str, name: str = "ev", extra: str = "") -> str:
    return (
        f"CREATE TABLE {name} (id {key_type} PRIMARY KEY, grp integer, t timestamptz NOT NULL,"
        f" v text{extra})"  # constants of this test module
    )


def _spec(src, dst, **kw):
    """Key ranges of about 50 rows of ev, no version column: the backfill's rows win."""
    keys = {"chunk_by": "key", "target_chunk_rows": 50, "conflict_policy": "backfill_wins"}
    return table_spec(src, dst, "ev", time_column="t", **{**keys, **kw})


def _plan(spec, src, dst, start="2024-01-01", end="2024-02-01"):
    return plan_on(spec, src, dst, start, end)


def _insert(url, ids, *, table="ev", grp=None):
    """Rows with the given ids, times spread over January 2024; grp: about id / 3 (NULL for every 5th id
    with ``grp="nulls"``)."""
    run_sql(
        url,
        sql.SQL(
            "INSERT INTO {t} SELECT i, CASE WHEN %s AND abs(i %% 5) = 0 THEN NULL ELSE trunc(abs(i %% 3000) / 3)::int END,"
            " '2024-01-01Z'::timestamptz + (abs(i * 7919 %% 2678400)) * interval '1 second', 'v' || i"
            " FROM unnest(%s::numeric[]) AS i"
        ).format(t=sql.Identifier(table)),
        (grp == "nulls", [str(i) for i in ids]),
    )
    run_sql(url, sql.SQL("ANALYZE {t}").format(t=sql.Identifier(table)))


def _load(spec, src, dst):
    plan = _plan(spec, src, dst)
    sizes = [transfer_chunk(spec, c).rows_extracted for c in plan.chunks]
    return plan, sizes


def _same(src, dst, table="ev"):
    q = sql.SQL("SELECT t::text FROM {t} t ORDER BY id").format(t=sql.Identifier(table))
    return run_sql(src, q) == run_sql(dst, q)


EDGE_SETS = {
    "bigint_extremes": (
        "bigint",
        [BIGINT_MIN, BIGINT_MIN + 1, -1, 0, 1, BIGINT_MAX - 1, BIGINT_MAX, *range(1000, 1400)],
    ),
    "smallint_gaps": ("smallint", [-32768, -32767, *range(-200, 200, 3), 30000, 32766, 32767]),
    "integer_gaps": ("integer", [-(2**31), *range(0, 300), 10**6, 10**9, 2**31 - 1]),
}


@pytest.mark.parametrize("shape", sorted(EDGE_SETS))
def test_extreme_and_gapped_keys_load_exactly_once(shape, src_url, dst_url):
    key_type, ids = EDGE_SETS[shape]
    for url in (src_url, dst_url):
        run_sql(url, _table(key_type))
    _insert(src_url, ids)
    spec = _spec(src_url, dst_url)
    plan, sizes = _load(spec, src_url, dst_url)
    assert len(plan.chunks) >= 3, plan.notes  # really cut into ranges
    assert plan.chunks[0].key_lo is None and plan.chunks[-1].key_hi is None
    assert all(a.key_hi == b.key_lo for a, b in zip(plan.chunks, plan.chunks[1:]))
    assert sum(sizes) == len(ids)
    assert _same(src_url, dst_url)


def test_a_nullable_key_column_that_is_not_the_unique_key_loses_no_null_row(src_url, dst_url):
    """key_column: grp (an integer column, not unique, NULL in every 5th row): NULLs go to the first range."""
    for url in (src_url, dst_url):
        run_sql(url, _table("bigint"))
    ids = list(range(1, 601))
    _insert(src_url, ids, grp="nulls")
    run_sql(src_url, "CREATE INDEX ON ev (grp); ANALYZE ev")
    spec = _spec(src_url, dst_url, key_column="grp", target_chunk_rows=100)
    plan, sizes = _load(spec, src_url, dst_url)
    assert len(plan.chunks) >= 2, plan.notes
    assert sum(sizes) == len(ids)
    assert _same(src_url, dst_url)
    # a second plan (resume by coverage) has nothing left to do
    assert _plan(spec, src_url, dst_url).chunks == []


def test_a_historical_key_expression_is_what_the_ranges_cut(src_url, dst_url):
    """Before 2024-01-16 rows come from ev_archive, whose own ``id`` column is NULL (a surrogate added later)
    and whose key is ``legacy_id``: the key ranges must cut the expression the rows are loaded with."""
    run_sql(dst_url, _table("bigint"))
    run_sql(src_url, _table("bigint"))
    run_sql(src_url, "CREATE TABLE ev_archive (id bigint, legacy_id bigint, grp integer, t timestamptz, v text)")
    ids = list(range(1, 401))
    _insert(src_url, ids)
    run_sql(src_url, "DELETE FROM ev WHERE t < '2024-01-16Z'")
    run_sql(
        src_url,
        "INSERT INTO ev_archive SELECT NULL, i, trunc(abs(i % 3000) / 3)::int, '2024-01-01Z'::timestamptz"
        " + (abs(i * 7919 % 2678400)) * interval '1 second', 'v' || i FROM generate_series(1, 400) i"
        " WHERE '2024-01-01Z'::timestamptz + (abs(i * 7919 % 2678400)) * interval '1 second' < '2024-01-16Z'",
    )
    run_sql(src_url, "ANALYZE ev_archive; ANALYZE ev")
    spec = _spec(
        src_url,
        dst_url,
        historical=[{"until": "2024-01-16", "source_table": "ev_archive", "column_expressions": {"id": "legacy_id"}}],
    )
    plan, sizes = _load(spec, src_url, dst_url)
    assert len({(c.key_lo, c.key_hi) for c in plan.chunks}) >= 2, plan.notes
    assert run_sql(dst_url, "SELECT count(*) FROM ev") == [(len(ids),)]
    assert sum(sizes) == len(ids)
    assert run_sql(dst_url, "SELECT count(*) FROM ev WHERE t < '2024-01-16Z'")[0][0] > 100  # the archive's part


@pytest.mark.parametrize(
    "key_type, value",
    [("text", "'a'"), ("uuid", "gen_random_uuid()"), ("numeric", "1.5"), ("double precision", "1")],
)
def test_a_non_integer_key_is_refused_before_any_write(key_type, value, src_url, dst_url):
    for url in (src_url, dst_url):
        run_sql(url, _table(key_type))
    run_sql(src_url, f"INSERT INTO ev VALUES ({value}, 1, '2024-01-02Z', 'x')")  # constants of this test
    with pytest.raises(PlanError, match=rf"chunk_by: key needs an integer key_column; 'id' of ev is {key_type}"):
        _plan(_spec(src_url, dst_url), src_url, dst_url)
    assert run_sql(dst_url, "SELECT count(*) FROM ev") == [(0,)]
    assert run_sql(dst_url, "SELECT to_regclass('public.backfill_ledger') IS NULL") == [(True,)]


def test_a_composite_key_needs_its_integer_column_named(src_url, dst_url):
    with pytest.raises(SpecError, match=r"chunk_by: key needs key_column"):
        _spec(src_url, dst_url, key_columns=["id", "v"])


# ------------------------------------------------------------------------------------------------
# property: any set of bigint keys, any target size, is loaded exactly once
# ------------------------------------------------------------------------------------------------
KEYS = st.one_of(
    st.integers(min_value=BIGINT_MIN, max_value=BIGINT_MAX),
    st.integers(min_value=-50, max_value=50),
    st.sampled_from([BIGINT_MIN, BIGINT_MIN + 1, BIGINT_MAX - 1, BIGINT_MAX, 0, -1]),
)


@pytest.fixture(scope="module")
def prop_dbs(databases):
    src, dst = databases.create("kpsrc"), databases.create("kpdst")
    return src, dst


def test_any_key_set_is_loaded_exactly_once(prop_dbs):
    src, dst = prop_dbs

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ids=st.lists(KEYS, unique=True, max_size=120), target=st.integers(min_value=1, max_value=60))
    def check(ids, target):
        for url in (src, dst):
            run_sql(url, "DROP TABLE IF EXISTS ev; DROP TABLE IF EXISTS backfill_ledger")
            run_sql(url, _table("bigint"))
        _insert(src, ids)
        spec = _spec(src, dst, target_chunk_rows=target)
        plan, sizes = _load(spec, src, dst)
        assert all(a.key_hi == b.key_lo for a, b in zip(plan.chunks, plan.chunks[1:]))
        assert sum(sizes) == len(ids)
        assert _same(src, dst)

    check()


def test_two_key_range_backfills_into_one_table_and_a_watermark_clip(src_url, dst_url):
    """Two sources (ev_us, ev_eu: overlapping ids would collide, so disjoint) load one table by key ranges,
    each its own backfill (ledger and locks); the live watermark clips both: rows at or after it stay out."""
    import datetime as dt

    from airflow_backfill_provider.live import advance_watermark, ensure_watermark_table
    from airflow_backfill_provider.core.spec import TableName

    run_sql(dst_url, _table("bigint"))
    for name, lo in (("ev_us", 1), ("ev_eu", 100_001)):
        run_sql(src_url, _table("bigint", name=name))
        _insert(src_url, range(lo, lo + 300), table=name)
    w = "2024-01-20T00:00:00+00:00"
    conn = psycopg2.connect(dst_url)
    with conn:
        ensure_watermark_table(conn, TableName.parse("public.backfill_watermarks"))
        with conn.cursor() as cur:
            advance_watermark(
                cur, TableName.parse("public.backfill_watermarks"), "public.ev", dt.datetime.fromisoformat(w)
            )
    conn.close()
    specs = [_spec(src_url, dst_url, name=n, source_table=n, target_chunk_rows=60) for n in ("ev_us", "ev_eu")]
    for spec in specs:
        plan = _plan(spec, src_url, dst_url)
        assert plan.clipped and len(plan.chunks) >= 3, plan.notes
        for c in plan.chunks:
            transfer_chunk(spec, c)
    for spec in specs:  # each backfill's ledger covers its own ranges only: nothing left, nothing reloaded
        assert _plan(spec, src_url, dst_url).chunks == []
    expected = sum(
        run_sql(src_url, sql.SQL("SELECT count(*) FROM {} WHERE t < %s").format(sql.Identifier(n)), (w,))[0][0]
        for n in ("ev_us", "ev_eu")
    )
    assert 0 < expected < 600
    assert run_sql(dst_url, "SELECT count(*), bool_and(t < %s) FROM ev", (w,)) == [(expected, True)]
    union = "SELECT t::text FROM (SELECT * FROM ev_us UNION ALL SELECT * FROM ev_eu) t WHERE t.t < %s ORDER BY id"
    assert run_sql(src_url, union, (w,)) == run_sql(dst_url, "SELECT t::text FROM ev t ORDER BY id")
