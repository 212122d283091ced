"""The newer-wins upsert from a staging table into the target, with its insert/update counts."""

from __future__ import annotations

from airflow_backfill_provider import sql as q
from airflow_backfill_provider.spec import TableName


def upsert_counted(
    cur,
    target: TableName,
    stage: str,
    columns,
    keys,
    version_column,
    conflict_policy,
    plan=None,
    *,
    first_write: bool = False,
) -> tuple[int, int]:
    """Run the newer-wins upsert from ``stage``; return (inserted, updated), read from the transaction's
    own per-table counters before and after it (free, and right for partitioned targets too).
    ``plan`` (a drift.ColumnPlan): casts run in the destination and the exact per-type change test.
    ``first_write``: nothing wrote ``target`` earlier in this transaction, so its counters start at 0
    and are read after the upsert only (one round trip less)."""
    counters = {"table": q.ident(target).as_string(cur)}
    ins0 = upd0 = 0
    if not first_write:
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
