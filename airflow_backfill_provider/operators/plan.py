"""PlanBackfillOperator: turn a DAG run into a list of small chunk descriptors to map over."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from airflow_backfill_provider.core.compat import AirflowFailException, BaseOperator, pool_exists, run_type_of
from airflow_backfill_provider.core.exceptions import BackfillError, PlanError
from airflow_backfill_provider.core.spec import BackfillSpec, load_spec

if TYPE_CHECKING:
    from airflow_backfill_provider.core.compat import Context


class PlanBackfillOperator(BaseOperator):
    """Plan the chunks of one run and run the pre-flight checks, before any chunk writes.

    Range: the ``start``/``end`` params when given (manual runs), else the run's data interval
    (scheduled runs and ``airflow backfill create`` / ``airflow dags backfill``). The end is clipped to
    the live watermark; chunks already in the ledger are skipped unless ``reprocess``. With ``dry_run``
    the chunks are listed in the log and none are returned, so nothing is written.

    :param spec: the backfill spec (a dict or :class:`BackfillSpec`), validated again at run time.
    :param start: first day (``YYYY-MM-DD`` or ISO timestamp, in the spec's timezone); templated.
    :param end: end of the range, exclusive; templated.
    :param granularity: chunk size for this run (the spec's by default); templated.
    :param reprocess: load chunks the ledger marks done.
    :param dry_run: list the chunks, write nothing.

    Each argument left ``None`` is read from the run's param of the same name (``context["params"]``:
    the factory's trigger form), as the typed value the form validated.
    """

    template_fields: Sequence[str] = ("start", "end", "granularity")
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        spec: dict[str, Any] | BackfillSpec,
        start: str | None = None,
        end: str | None = None,
        granularity: str | None = None,
        reprocess: bool | None = None,
        dry_run: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec.model_dump(mode="json") if isinstance(spec, BackfillSpec) else dict(spec)
        # None: the run's param of the same name (the factory's trigger form), read from context["params"]
        self.start = start
        self.end = end
        self.granularity = granularity
        self.reprocess = reprocess
        self.plan_only = dry_run  # not ``dry_run``: that is BaseOperator's own method

    def _param(self, context: Context, name: str, given: Any) -> Any:
        if given is not None:
            return given
        return (context.get("params") or {}).get(name)

    def _check_pool(self, pool: str) -> None:
        """Fail at once if the chunks' pool is missing: the scheduler would leave them 'scheduled' forever."""
        fix = f'airflow pools set {pool} 4 "source slots for backfills" --include-deferred'
        exists = pool_exists(pool)
        if exists is False:
            raise AirflowFailException(
                f"the Airflow pool {pool!r} (spec key 'pool') does not exist: the chunks would stay "
                f"'scheduled' forever. Create it, then clear this task: {fix}"
            )
        if exists is None:  # Airflow 3: a task cannot read pools (compat.pool_exists)
            self.log.info("Chunks run in the Airflow pool %r; if they stay 'scheduled', it is missing: %s", pool, fix)

    def execute(self, context: Context) -> list[dict[str, Any]]:
        from airflow_backfill_provider.observe import progress_log
        from airflow_backfill_provider.prepare import facts
        from airflow_backfill_provider.connections import close_all, connect, open_source
        from airflow_backfill_provider.plan.planning import (
            PLAN_STATEMENT_TIMEOUT_S,
            build_plan,
            preflight,
            resolve_range,
        )

        spec = load_spec(self.spec)
        if context.get("dag_run") is not None:  # only a DAG run queues chunks in the pool
            self._check_pool(spec.pool)
        try:
            dry_run = _truthy(self._param(context, "dry_run", self.plan_only), what="dry_run")
            reprocess = _truthy(self._param(context, "reprocess", self.reprocess), what="reprocess")
            start, end = resolve_range(
                spec,
                param_start=_blank_to_none(self._param(context, "start", self.start)),
                param_end=_blank_to_none(self._param(context, "end", self.end)),
                run_type=run_type_of(context),
                interval_start=context.get("data_interval_start"),
                interval_end=context.get("data_interval_end"),
            )
            appname = f"backfill:{spec.effective_dag_id}:plan"
            dst = src = None
            try:
                dst = connect(spec.destination_conn_id, application_name=appname, timezone=spec.timezone)
                src = open_source(spec, appname, statement_timeout_s=PLAN_STATEMENT_TIMEOUT_S)
                plan = build_plan(
                    spec,
                    start,
                    end,
                    granularity=_blank_to_none(self._param(context, "granularity", self.granularity)),
                    reprocess=reprocess,
                    dst_conn=dst,
                    src_conn=src,
                )
                # pre-flight: tables, columns, unique key, drift decisions, before any chunk writes
                for level, message in preflight(spec, plan, src, dst):
                    self.log.log(level, "%s", message)
                # once for every chunk: (swap) parallel table ready, fingerprints, catalog facts,
                # identity; each chunk checks one fingerprint statement per side (prepare/facts.py)
                prepared = facts.prepare_run(spec, src, dst, plan.chunks) if plan.chunks and not dry_run else None
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
        from airflow_backfill_provider.plan import batches

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
        mapped = prepared.attach(mapped) if prepared is not None else mapped
        return progress_log.number(mapped, est_rows)


def _blank_to_none(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", "None", "null") else text


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "", "none")


def _truthy(value: Any, *, what: str) -> bool:
    """A boolean param; anything unrecognised is refused (a typo in dry_run must not mean 'write')."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise PlanError(f"param {what}={value!r} is not a boolean; use true or false")
