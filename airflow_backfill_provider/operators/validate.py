"""ValidateBackfillOperator: compare source and destination per day at the end of a backfill run."""

from __future__ import annotations

from typing import Any, Sequence


from airflow_backfill_provider.core.compat import AirflowFailException, AirflowSkipException, BaseOperator
from airflow_backfill_provider.core.spec import BackfillSpec


class ValidateBackfillOperator(BaseOperator):
    """Per local day: row counts and sums of ``validation.sum_columns``, source vs destination.

    The range is the plan task's XCom (key ``"plan"``: ``start``/``end`` after watermark clipping, and
    ``dry_run``), or explicit ``start``/``end``. The per-day table (worst days first) goes to the task
    log, one summary row to ``validation.report_table`` in the destination, and the totals are the
    return value (a small XCom). Days over ``fail_threshold`` fail the task without retries; days
    between the thresholds only warn.

    :param spec: the backfill spec (a dict or :class:`BackfillSpec`).
    :param plan_task_id: the task whose ``"plan"`` XCom holds the range (ignored with start/end).
    :param start: explicit range start (ISO date or timestamp, spec timezone); templated.
    :param end: explicit range end (exclusive); templated.
    :param source: Airflow connection id or DSN of the source (default: the spec's); templated.
    :param destination: same for the destination; templated.
    """

    template_fields: Sequence[str] = ("start", "end", "source", "destination")
    ui_color = "#fcf8e3"

    def __init__(
        self,
        *,
        spec: dict[str, Any] | BackfillSpec,
        plan_task_id: str = "plan",
        start: str | None = None,
        end: str | None = None,
        source: str | None = None,
        destination: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from airflow_backfill_provider.core.dsn import dsn_has_password, password_dsn_message

        for key, value in (("source", source), ("destination", destination)):
            if value and dsn_has_password(value):  # serialized with the DAG: never a secret
                raise ValueError(password_dsn_message(key))
        self.spec = spec.model_dump(mode="json") if isinstance(spec, BackfillSpec) else dict(spec)
        self.plan_task_id = plan_task_id
        self.start = start
        self.end = end
        self.source = source
        self.destination = destination

    def execute(self, context) -> dict:
        from airflow_backfill_provider.core.exceptions import BackfillError, ValidationFailed
        from airflow_backfill_provider.core.spec import load_spec
        from airflow_backfill_provider.validate import FAIL, WARN, validate_range

        spec = load_spec(self.spec)
        if not spec.validation.enabled:
            raise AirflowSkipException("validation.enabled is false in the spec")
        start, end = self._range(context)
        run_id = getattr(context.get("dag_run"), "run_id", None) or context.get("run_id")
        try:
            report = validate_range(
                spec, start, end, source=self.source, destination=self.destination, dag_id=self.dag_id, run_id=run_id
            )
        except BackfillError as err:
            raise AirflowFailException(str(err)) from err
        self.log.info("%s", report.format_table())
        totals = report.totals()
        from airflow_backfill_provider.observe.progress import day_reason

        def reason(d) -> str:  # the same words as the progress page and the status command
            return day_reason(d.diffs, d.status, report.warn_threshold, report.fail_threshold)

        not_passing = [d for d in report.ranked() if d.status != "pass"]
        for d in not_passing[:10]:
            self.log.info("Validation %s on %s: %s", d.status.upper(), d.day.isoformat(), reason(d))
        if report.status == FAIL:
            plan = self._plan(context) or {}
            short = [d for d in report.ranked() if d.status == FAIL and d.destination_rows < d.source_rows]
            # the plan trusted the ledger for some chunks: say so, the destination's state contradicts it
            trusted = (
                f"The plan skipped {plan['skipped_done']} chunk(s) the ledger records as loaded, and the destination "
                f"holds {totals['destination_rows']} of {totals['source_rows']} source rows"
                + (
                    f" (e.g. {short[0].day.isoformat()}: {short[0].destination_rows} of {short[0].source_rows})"
                    if short
                    else ""
                )
                + ": the ledger's claims no longer hold (rows deleted or the table emptied since?). "
                "Run again with reprocess=true over this range. "
                if plan.get("skipped_done") and totals["destination_rows"] != totals["source_rows"]
                else ""
            )
            failure = ValidationFailed(
                trusted + f"{totals['days_fail']} of {totals['days']} day(s) of {report.table} differ by more than "
                f"fail_threshold={report.fail_threshold:.2%}; worst {not_passing[0].day.isoformat()}: "
                f"{reason(not_passing[0])}; failed days: "
                f"{', '.join(totals['failed_days'])}{' ...' if totals['failed_days_more'] else ''}. "
                + (
                    f"The checksum of the loaded columns differs on {', '.join(totals['checksum_days_differ'])} "
                    "(a value was altered, or rows differ). "
                    if totals.get("checksum_days_differ")
                    else ""
                )
                + "Reload those days (trigger with start/end around them and reprocess=true); if the destination "
                "has rows the source no longer has, look for deletes in the source since the load."
            )
            raise AirflowFailException(str(failure)) from failure
        if report.status == WARN:
            self.log.warning(
                "%d day(s) of %s differ by more than warn_threshold=%.2f%% (under fail_threshold)",
                totals["days_warn"],
                report.table,
                spec.validation.warn_threshold * 100,
            )
        from airflow_backfill_provider.assets import attach_extra, event_extra

        attach_extra(self, context, spec, event_extra(totals, dag_id=self.dag_id, run_id=run_id))
        return totals

    def _plan(self, context) -> dict | None:
        if self.start or self.end:
            return None
        plan = context["ti"].xcom_pull(task_ids=self.plan_task_id, key="plan")
        return plan if isinstance(plan, dict) else None

    def _range(self, context) -> tuple[str, str]:
        if self.start or self.end:
            if not (self.start and self.end):
                raise AirflowFailException("give both start and end to ValidateBackfillOperator, or neither")
            return str(self.start), str(self.end)
        plan = context["ti"].xcom_pull(task_ids=self.plan_task_id, key="plan")
        if not isinstance(plan, dict) or "start" not in plan or "end" not in plan:
            raise AirflowFailException(
                f"no 'plan' XCom from task {self.plan_task_id!r} (got {plan!r}): run the plan task first, "
                "or pass start/end explicitly"
            )
        if plan.get("dry_run"):
            raise AirflowSkipException("dry run: nothing was written, nothing to validate")
        from airflow_backfill_provider.core.chunks import parse_datetime, utc

        # instants (a fall-back night compares equal by wall clock); e.g. the whole range at/after the watermark
        if utc(parse_datetime(plan["end"])) <= utc(parse_datetime(plan["start"])):
            raise AirflowSkipException(f"empty range [{plan['start']}, {plan['end']}): nothing was backfilled")
        return plan["start"], plan["end"]
