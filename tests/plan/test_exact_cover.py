"""One exact cover for every chunking (issue 25, item 3): every source row of the range is read exactly once.

A property over chunk_by (time, key), granularity (hour .. month, auto), historical ranges (own source
table with column expressions, own table, expressions only) and single chunks vs batches, against the real
server, through the plan and the chunk operator as a DAG run would call them. Rows sit on chunk and
``until`` edges and outside the range too.
"""

from __future__ import annotations

import pendulum
import psycopg2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from airflow_backfill_provider.plan import batches
from airflow_backfill_provider.core.compat import DAG
from airflow_backfill_provider.operators.chunk import BackfillChunkOperator
from airflow_backfill_provider.plan.planning import build_plan
from tests.session_helpers import run_sql
from tests.specs import table_spec

START = "2024-03-01"
#: per granularity, a range of a few chunks (a property run must stay short): [START, START + seconds)
SPAN_S = {"hour": 10 * 3600, "day": 7 * 86400, "week": 35 * 86400, "month": 122 * 86400, "auto": 7 * 86400}
HISTORICAL = ("none", "own_table_expressions", "own_table", "expressions")
TABLE = "CREATE TABLE {} (id bigint PRIMARY KEY, t timestamptz NOT NULL, u timestamptz NOT NULL, v text)"
#: the archive of issue 25's N1 reproduction: other column names, loaded through expressions
ARCHIVE = "CREATE TABLE ev_old (legacy_id bigint PRIMARY KEY, t timestamptz NOT NULL, u timestamptz, val text)"


@pytest.fixture(scope="module")
def cover_dbs(databases):
    return databases.create("coversrc"), databases.create("coverdst")


def _load(src: str, dst: str, *, chunk_by, granularity, historical, until_s, rows, max_mapped, max_batches, tz):
    """Seed ``rows`` [(id, seconds after START)], plan and run every mapped descriptor; (plan, mapped)."""
    for url in (src, dst):
        run_sql(url, "DROP TABLE IF EXISTS ev, ev_old, backfill_ledger")
        run_sql(url, TABLE.format("ev"))
    run_sql(src, ARCHIVE if historical == "own_table_expressions" else TABLE.format("ev_old"))
    archived = historical in ("own_table_expressions", "own_table")
    for table in ("ev", "ev_old"):
        # with an archive, rows before ``until`` live in it only; after it, in ev only
        side = "" if not archived else ("AND s < %(until)s" if table == "ev_old" else "AND s >= %(until)s")
        if table == "ev_old" and not archived:
            continue
        run_sql(
            src,
            f"INSERT INTO {table} SELECT k, (%(start)s::timestamp AT TIME ZONE %(tz)s)"
            f" + s * interval '1 second', '2025-01-01Z'::timestamptz + k * interval '1 second', 'v' || k"
            f" FROM unnest(%(ids)s::bigint[], %(secs)s::bigint[]) AS r(k, s) WHERE true {side}",  # noqa: S608 - constants
            {"start": START, "tz": tz, "until": until_s, "ids": [k for k, _ in rows], "secs": [s for _, s in rows]},
        )
        run_sql(src, f"ANALYZE {table}")
    historical_spec = []
    if historical != "none":
        until = _at(src, tz, until_s)
        rng: dict = {"until": until}
        if archived:
            rng["source_table"] = "ev_old"
        if historical == "own_table_expressions":
            rng["column_expressions"] = {"id": "legacy_id", "v": "val"}
        elif historical == "expressions":
            rng["column_expressions"] = {"v": "v || ''"}
        historical_spec.append(rng)
    spec = table_spec(
        src,
        dst,
        "ev",
        time_column="t",
        version_column="u",
        chunk_by=chunk_by,
        granularity=granularity,
        target_chunk_rows=7,  # key ranges and auto-sized chunks of a few rows: several per example
        timezone=tz,
        historical=historical_spec,
        max_mapped_chunks=max_mapped,
        max_batches=max_batches,
        watermark={"enabled": False},
        throttle={"max_active": 10_000},  # other tests on the server must not defer a chunk here
        retries=0,
    )
    end = _at(src, tz, SPAN_S[granularity])
    s, d = psycopg2.connect(src), psycopg2.connect(dst)
    try:
        plan = build_plan(spec, _at(src, tz, 0), end, src_conn=s, dst_conn=d)
    finally:
        s.close()
        d.close()
    mapped = batches.descriptors(spec, plan.chunks, granularity=plan.granularity)
    for descriptor in mapped:
        with DAG(dag_id="bf_exact_cover", schedule=None, start_date=pendulum.datetime(2024, 1, 1)):
            op = BackfillChunkOperator(task_id="load_chunk", spec=spec.model_dump(mode="json"), chunk=descriptor)
        op.execute({})
    return plan, mapped, end


def _at(url: str, tz: str, seconds: int) -> str:
    """START (local midnight in ``tz``) + ``seconds``, as an ISO instant."""
    return run_sql(
        url,
        "SELECT to_char((%s::timestamp AT TIME ZONE %s + %s * interval '1 second') AT TIME ZONE 'UTC',"
        ' \'YYYY-MM-DD"T"HH24:MI:SS"Z"\')',
        (START, tz, seconds),
    )[0][0]


def _source_rows(src: str, historical: str, until: str | None, start: str, end: str) -> list[tuple]:
    """The rows the range must hold, as the destination should: (id, t, u, v) as text."""
    if historical == "own_table_expressions":
        union = (
            "SELECT legacy_id AS id, t, u, val AS v FROM ev_old WHERE t < %(until)s"
            " UNION ALL SELECT id, t, u, v FROM ev WHERE t >= %(until)s"
        )
    elif historical == "own_table":
        union = "SELECT * FROM ev_old WHERE t < %(until)s UNION ALL SELECT * FROM ev WHERE t >= %(until)s"
    else:
        union = "SELECT * FROM ev"
    return run_sql(
        src,
        f"SELECT id, t::text, u::text, v FROM ({union}) r WHERE t >= %(start)s AND t < %(end)s ORDER BY id",  # noqa: S608 - constants
        {"until": until, "start": start, "end": end},
    )


ROWS = st.lists(
    st.tuples(
        st.integers(min_value=-500, max_value=5000),
        # anywhere, on an hour edge, or just outside the range (never read)
        st.one_of(st.integers(0, 122 * 86400), st.integers(0, 122 * 24).map(lambda h: h * 3600), st.just(-1)),
    ),
    unique_by=lambda r: r[0],
    max_size=60,
)


@pytest.mark.slow  # about 50 s: in `make test`, not in the quick `make check`
@pytest.mark.timeout(900)
def test_every_source_row_of_the_range_is_read_exactly_once(cover_dbs):
    src, dst = cover_dbs

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        chunk_by=st.sampled_from(["time", "key"]),
        granularity=st.sampled_from(list(SPAN_S)),
        historical=st.sampled_from(HISTORICAL),
        until_frac=st.floats(min_value=0.05, max_value=0.95),
        rows=ROWS,
        batched=st.booleans(),
        max_batches=st.integers(min_value=1, max_value=3),
        tz=st.sampled_from(["UTC", "America/New_York"]),
    )
    # issue 25 (N1): key batches + a historical range with its own source table lost the halves after until
    @example(
        chunk_by="key",
        granularity="day",
        historical="own_table_expressions",
        until_frac=0.5,
        rows=[(k, k * 7919 % (7 * 86400)) for k in range(1, 61)],
        batched=True,
        max_batches=2,
        tz="UTC",
    )
    def check(chunk_by, granularity, historical, until_frac, rows, batched, max_batches, tz):
        span = SPAN_S[granularity]
        until_s = int(span * until_frac) // 60 * 60
        rows = [(k, s % span if s >= 0 else span + 1) for k, s in rows]  # span + 1: after the range
        if historical == "own_table_expressions" and rows:
            rows.append((rows[0][0] + 10_000, until_s))  # a row exactly on until: ev's, not the archive's
        plan, mapped, end = _load(
            src,
            dst,
            chunk_by=chunk_by,
            granularity=granularity,
            historical=historical,
            until_s=until_s,
            rows=rows,
            max_mapped=1 if batched else 1024,
            max_batches=max_batches,
            tz=tz,
        )
        if batched and len(plan.chunks) > 1:
            assert all(batches.is_batch(d) for d in mapped)
        until = _at(src, tz, until_s) if historical != "none" else None
        expected = _source_rows(src, historical, until, _at(src, tz, 0), end)
        assert run_sql(dst, "SELECT id, t::text, u::text, v FROM ev ORDER BY id") == expected
        ledger = run_sql(dst, "SELECT count(*), coalesce(sum(rows_extracted), 0)::int FROM backfill_ledger")
        assert ledger == [(len(plan.chunks), len(expected))]

    check()
