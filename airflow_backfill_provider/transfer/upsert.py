"""The newer-wins upsert from a staging table into the target, with its insert/update counts."""

from __future__ import annotations

from airflow_backfill_provider.core import sql as q
from airflow_backfill_provider.core.spec import TableName


def upsert_counted(
    cur,
    target: TableName,
    stage: str,
    columns,
    keys,
    version_column,
    conflict_policy,
    plan=None,
) -> tuple[int, int]:
    """Run the newer-wins upsert from ``stage``; return (inserted, updated), read from the transaction's
    own per-table counters before and after it (free, and right for partitioned targets too).
    ``plan`` (a drift.ColumnPlan): casts run in the destination and the exact per-type change test.

    Read before too, always: PostgreSQL keeps a session's counters of committed transactions until it
    flushes its statistics (at most once a second, when idle), so a batch's second chunk on the same
    session starts from the first one's counts, not 0."""
    counters = {"table": q.ident(target).as_string(cur)}
    cur.execute(q.xact_write_counts(), counters)
    ins0, upd0 = cur.fetchone()
    extra = (
        {"insert_exprs": plan.insert_exprs, "changed": plan.changed, "identity_always": plan.identity_always}
        if plan is not None
        else {}
    )
    cur.execute(q.upsert(target, stage, columns, keys, version_column, conflict_policy, **extra))
    cur.execute(q.xact_write_counts(), counters)
    ins1, upd1 = cur.fetchone()
    return ins1 - ins0, upd1 - upd0
