"""The asset (dataset on 2.11) a finished, validated backfill run emits for its destination table.

URI ``backfill://<destination_conn_id>/<schema>.<table>``: built from the spec alone, because DAG files must
not resolve connections (a network or database lookup) at parse time. Schedule a downstream DAG on it with
``schedule=[destination_asset(spec)]`` or the same URI. The event's extra says what was loaded:
``{"range_start", "range_end", "rows", "status", "days", "dag_id", "run_id"}``.

The validate task declares the asset as its outlet, so the event exists only when validation passed (or
only warned): a failed validation fails the task, a dry run or an empty range skips it, and neither emits.
"""

from __future__ import annotations

from airflow_backfill_provider.core.compat import Asset
from airflow_backfill_provider.core.spec import BackfillSpec

SCHEME = "backfill"


def destination_uri(spec: BackfillSpec) -> str:
    dest = spec.destination
    return f"{SCHEME}://{spec.destination_conn_id}/{dest.schema_ or 'public'}.{dest.name}"


def destination_asset(spec: BackfillSpec):
    return Asset(destination_uri(spec))


def event_extra(totals: dict, *, dag_id: str | None, run_id: str | None) -> dict:
    """What the asset event carries: the validated range and its rows (small, JSON-safe)."""
    return {
        "range_start": totals.get("range_start"),
        "range_end": totals.get("range_end"),
        "rows": totals.get("destination_rows"),
        "status": totals.get("status"),
        "days": totals.get("days"),
        "dag_id": dag_id,
        "run_id": run_id,
    }


def attach_extra(operator, context, spec: BackfillSpec, extra: dict) -> None:
    """Put ``extra`` on the outlet event of the destination asset (the only outlet this provider declares)."""
    uri = destination_uri(spec)
    events = context.get("outlet_events")
    if events is None:
        return
    for outlet in getattr(operator, "outlets", None) or []:
        if getattr(outlet, "uri", None) == uri:
            events[outlet].extra = extra
