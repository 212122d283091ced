"""PlanBackfillOperator: turn a DAG run into a list of small chunk descriptors to map over."""

from __future__ import annotations

from typing import Any, Sequence

from airflow_backfill_provider.compat import AirflowFailException, BaseOperator, run_type_of
from airflow_backfill_provider.exceptions import BackfillError, PlanError
from airflow_backfill_provider.spec import BackfillSpec, load_spec


class PlanBackfillOperator(BaseOperator):
    """Plan the chunks of one run and run the pre-flight checks, before any chunk writes.

    Range: the ``start``/``end`` params when given (manual runs), else the run's data interval
    (scheduled runs and ``airflow backfill create`` / ``airflow dags backfill``). The end is clipped to
    the live watermark; chunks already in the ledger are skipped unless ``reprocess``. With ``dry_run``
    the chunks are listed in the log and none are returned, so nothing is written.

    :param spec: the backfill spec (a dict or :class:`BackfillSpec`), validated again at run time.
    """

    template_fields: Sequence[str] = ("start", "end", "granularity", "reprocess", "dry_run")
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        spec: dict[str, Any] | BackfillSpec,
        start: str | None = "{{ params.start }}",
        end: str | None = "{{ params.end }}",
        granularity: str | None = "{{ params.granularity }}",
        reprocess: bool | str = "{{ params.reprocess }}",
        dry_run: bool | str = "{{ params.dry_run }}",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec.model_dump(mode="json") if isinstance(spec, BackfillSpec) else dict(spec)
        self.start = start
        self.end = end
        self.granularity = granularity
        self.reprocess = reprocess
        self.dry_run = dry_run

    def execute(self, context) -> list[dict[str, str]]:
        from airflow_backfill_provider import identity, progress_log
        from airflow_backfill_provider.checks import null_time_rows
        from airflow_backfill_provider.connections import close_all, connect
        from airflow_backfill_provider.planning import build_plan, resolve_range
        from airflow_backfill_provider.schema import time_column_indexed
        from airflow_backfill_provider.swap import as_live, ensure_parallel_table
        from airflow_backfill_provider.timebounds import check_granularity
        from airflow_backfill_provider.source import prepare

        spec = load_spec(self.spec)
        try:
            dry_run = _truthy(self.dry_run, what="dry_run")
            reprocess = _truthy(self.reprocess, what="reprocess")
            start, end = resolve_range(
                spec,
                param_start=_blank_to_none(self.start),
                param_end=_blank_to_none(self.end),
                run_type=run_type_of(context),
                interval_start=context.get("data_interval_start"),
                interval_end=context.get("data_interval_end"),
            )
            dst = src = None
            try:
                dst = connect(
                    spec.destination_conn_id,
                    application_name=f"backfill:{spec.effective_dag_id}:plan",
                    timezone=spec.timezone,
                )
                src = connect(
                    spec.source_conn_id,
                    application_name=f"backfill:{spec.effective_dag_id}:plan",
                    readonly=True,
                    timezone=spec.timezone,
                    statement_timeout_s=30,
                    lock_timeout_s=spec.lock_timeout_s,
                )
                plan = build_plan(
                    spec,
                    start,
                    end,
                    granularity=_blank_to_none(self.granularity),
                    reprocess=reprocess,
                    dst_conn=dst,
                    src_conn=src,
                )
                # pre-flight: tables, columns, unique key, drift decisions, before any chunk writes
                # (swap mode: against the live table; the parallel one is created LIKE it, below)
                for chunk in _one_per_source(spec, plan.chunks):
                    src_table, cplan = prepare(as_live(spec), src, dst, chunk)
                    check_granularity(cplan.time_kind, plan.granularity, column=spec.time_column)  # a param override
                    for decision in cplan.decisions:
                        self.log.info("Schema decision for %s (from %s): %s", chunk.chunk_id, src_table, decision)
                    # historical mode may filter on another column (e.g. created_at: "created")
                    time_col = _time_filter_column(spec, chunk)
                    indexed = time_column_indexed(src, src_table, time_col)
                    if not indexed:
                        self.log.warning(
                            "Source %s has no index leading on %s: every chunk will scan the whole table. "
                            "Ask the source's owner for an index on it, or use a coarser granularity.",
                            src_table,
                            time_col,
                        )
                    # without an index an exact count would scan the table: use the planner's estimate
                    warning = null_time_rows(src, src_table, time_col, exact=indexed).message
                    if warning:
                        self.log.warning("%s", warning)
                if plan.chunks and not dry_run:
                    ensure_parallel_table(dst, spec)  # Pattern B: <table>_backfill; no-op in upsert mode
                # resolved once here and carried by every chunk descriptor (identity.carried)
                backfill = identity.of(spec, src, dst) if plan.chunks and not dry_run else None
                est_rows = progress_log.estimate_rows(src, spec, plan.start, plan.end) if plan.chunks else 0
                rate = progress_log.measured_rate(dst, spec, plan.backfill_key) if plan.chunks else None
            finally:
                close_all(dst, src)  # also when the source connect fails: no leaked destination session
        except BackfillError as err:
            raise AirflowFailException(str(err)) from err

        for note in plan.notes:
            self.log.info("%s", note)
        self.log.info(
            "Plan for %s: [%s, %s) at %s: %d chunk(s) to load, %d already done%s",
            spec.destination,
            plan.start,
            plan.end,
            plan.granularity,
            len(plan.chunks),
            len(plan.skipped),
            " (DRY RUN: nothing will be written)" if dry_run else "",
        )
        self.log.info("%s", progress_log.plan_message(len(plan.chunks), len(plan.skipped), est_rows, rate))
        from airflow_backfill_provider import batches

        for chunk in batches.loggable(plan.chunks):
            self.log.info("  chunk %-24s [%s, %s)", chunk.chunk_id, chunk.start, chunk.end)
        context["ti"].xcom_push(key="plan", value=plan.summary(dry_run=dry_run))
        mapped = batches.descriptors(spec, plan.chunks, granularity=plan.granularity, reprocess=reprocess)
        if len(mapped) < len(plan.chunks):
            self.log.info(
                "%d chunks run in %d batches (mapped task instances) of up to %d: over max_mapped_chunks=%d; "
                "each chunk commits on its own, a retried batch skips the chunks already in the ledger",
                len(plan.chunks),
                len(mapped),
                batches.batch_size(spec, len(plan.chunks)),
                spec.max_mapped_chunks,
            )
        if dry_run:
            return []
        mapped = identity.attach(mapped, backfill) if backfill is not None else mapped
        return progress_log.number(mapped, est_rows)


def _one_per_source(spec: BackfillSpec, chunks):
    """The first chunk of each historical source range: enough to check every source table once."""
    from airflow_backfill_provider.source import source_for

    seen = set()
    for chunk in chunks:
        key = repr(source_for(spec, chunk))
        if key not in seen:
            seen.add(key)
            yield chunk


def _time_filter_column(spec: BackfillSpec, chunk) -> str:
    """The source column the chunk filter compares: the time column, or a historical bare-column alias."""
    from airflow_backfill_provider.source import source_for

    expr = source_for(spec, chunk)[1].get(spec.time_column)
    if expr is None:
        return spec.time_column
    text = expr.strip()
    return text[1:-1].replace('""', '"') if len(text) > 1 and text[0] == text[-1] == '"' else text


def _blank_to_none(value):
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", "None", "null") else text


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "", "none")


def _truthy(value, *, what: str) -> bool:
    """A boolean param; anything unrecognised is refused (a typo in dry_run must not mean 'write')."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise PlanError(f"param {what}={value!r} is not a boolean; use true or false")
