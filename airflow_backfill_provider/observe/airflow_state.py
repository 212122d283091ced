"""What the progress views read from Airflow's metadata database: the spec, runs, chunk task states, plan.

Used inside the API server (the plugin's page) and by ``python -m airflow_backfill_provider status``
(like the ``airflow`` CLI, it needs the metadata database configured). One query per read: the task
states of 20k mapped chunks are one SELECT, where the REST API would page them 100 at a time.
Never imported by DAG files or tasks (tasks cannot use the metadata database on Airflow 3).
"""

from __future__ import annotations

import datetime as dt
import json

from airflow_backfill_provider.core.compat import AIRFLOW_V_3
from airflow_backfill_provider.core.exceptions import SpecError
from airflow_backfill_provider.observe.progress import RunInfo, TaskState
from airflow_backfill_provider.core.spec import BackfillSpec, load_spec

CHUNK_TASK = "load_chunk"
PLAN_TASK = "plan"


def _session():
    from airflow.utils.session import create_session

    return create_session()


def spec_for_dag(dag_id: str) -> BackfillSpec:
    """The spec a backfill DAG was built from, read back from its serialized DAG (chunk task's partial kwargs).

    Raises :class:`SpecError` naming the fix when the DAG is unknown or not a backfill DAG.
    """
    dag = _serialized_dag(dag_id)
    if dag is None:
        raise SpecError(
            f"DAG {dag_id!r} is not in Airflow's metadata database (not parsed yet, or a typo); "
            "pass --config <spec.yaml> to read the spec from its file"
        )
    task = dag.task_dict.get(CHUNK_TASK)
    spec = getattr(task, "partial_kwargs", {}).get("spec") if task is not None else None
    if not isinstance(spec, dict):
        raise SpecError(
            f"DAG {dag_id!r} has no mapped {CHUNK_TASK!r} task with a backfill spec: it is not a backfill DAG "
            "built by airflow_backfill_provider (pass --config <spec.yaml> if it is)"
        )
    return load_spec(spec, where=f"of DAG {dag_id}")


def _serialized_dag(dag_id: str):
    """The serialized DAG; else (2.11 without DAG serialization of this DAG, e.g. after dag.test()) the DAG
    parsed from the configured dags folder, as the ``airflow`` CLI does."""
    from airflow.models.serialized_dag import SerializedDagModel

    with _session() as session:
        dag = SerializedDagModel.get_dag(dag_id, session=session)
    if dag is None and not AIRFLOW_V_3:
        from airflow.models.dagbag import DagBag

        dag = DagBag(include_examples=False).get_dag(dag_id)
    return dag


def backfill_dag_ids() -> list[str]:
    """DAGs tagged 'backfill' (the factory tags every DAG it builds), for the page's index."""
    from airflow.models.dag import DagModel, DagTag
    from sqlalchemy import select

    with _session() as session:
        rows = session.execute(
            select(DagModel.dag_id).join(DagTag, DagTag.dag_id == DagModel.dag_id).where(DagTag.name == "backfill")
        ).all()
    return sorted({r[0] for r in rows})


def _logical_date_column():
    from airflow.models.dagrun import DagRun

    return DagRun.logical_date if AIRFLOW_V_3 else DagRun.execution_date


def _backfill_column():
    """Airflow 3: the run's Backfill (``dag_run.backfill_id``); 2.11 has no Backfill object: NULL."""
    from airflow.models.dagrun import DagRun
    from sqlalchemy import null

    return DagRun.backfill_id if AIRFLOW_V_3 else null()


def runs(dag_id: str, limit: int = 50, *, backfill_id: str | None = None, backfill: bool = False) -> list[dict]:
    """Latest runs of the DAG, most recently started first: run_id, state, run_type, start/end dates, logical
    date, backfill id (Airflow 3). ``backfill``: only the runs of one backfill (:func:`backfill_runs`)."""
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    order = DagRun.start_date.desc().nulls_last() if AIRFLOW_V_3 else DagRun.execution_date.desc()
    query = select(DagRun.run_id, DagRun.state, DagRun.run_type, DagRun.start_date, DagRun.end_date, DagRun.conf,
                   _logical_date_column(), _backfill_column()).where(DagRun.dag_id == dag_id)  # fmt: skip
    if backfill:
        if AIRFLOW_V_3:
            query = query.where(DagRun.backfill_id == int(backfill_id or 0))
        else:  # 2.11: the DAG's backfill-type runs (``airflow dags backfill``)
            query = query.where(DagRun.run_type == "backfill")
    with _session() as session:
        rows = session.execute(query.order_by(order, DagRun.id.desc()).limit(limit)).all()
    return [
        {"run_id": r[0], "state": str(getattr(r[1], "value", r[1]) or ""), "run_type": str(getattr(r[2], "value", r[2])),
         "start_date": r[3], "end_date": r[4], "conf": r[5] or {}, "logical_date": r[6],
         "backfill_id": None if r[7] is None else str(r[7])}
        for r in rows
    ]  # fmt: skip


def in_logical_order(listed: list[dict]) -> list[dict]:
    """Runs by logical date (a run without one, e.g. a manual run on Airflow 3, by its start), then run id."""
    far = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    return sorted(listed, key=lambda r: (r.get("logical_date") or r.get("start_date") or far, r["run_id"]))


def backfill_of(run: dict) -> str | None:
    """The backfill a run (a :func:`runs` row) belongs to: Airflow 3's Backfill id; on 2.11 ``"runs"`` for a
    backfill-type run (all the DAG's backfill-type runs are its backfill: 2.11 has no Backfill object); else None."""
    if run.get("backfill_id") is not None:
        return str(run["backfill_id"])
    if not AIRFLOW_V_3 and run.get("run_type") == "backfill":
        return "runs"
    return None


def latest_backfill(dag_id: str) -> str | None:
    """The DAG's newest backfill: Airflow 3's highest Backfill id; 2.11: ``"runs"`` when it has backfill-type runs."""
    from sqlalchemy import func, select

    with _session() as session:
        if AIRFLOW_V_3:
            from airflow.models.backfill import Backfill

            found = session.scalar(select(func.max(Backfill.id)).where(Backfill.dag_id == dag_id))
            return None if found is None else str(found)
        from airflow.models.dagrun import DagRun

        found = session.scalar(select(func.count()).where(DagRun.dag_id == dag_id, DagRun.run_type == "backfill"))
        return "runs" if found else None


def backfill_runs(dag_id: str, backfill_id: str) -> list[dict]:
    """All runs of one backfill, in logical-date order: on Airflow 3 those with its Backfill id, on 2.11 the DAG's
    backfill-type runs. Raises :class:`SpecError` when there are none."""
    if AIRFLOW_V_3 and not str(backfill_id).isdigit():
        raise SpecError(f"a backfill id is a number (Airflow 3's Backfill id, /api/v2/backfills), not {backfill_id!r}")
    listed = in_logical_order(runs(dag_id, limit=100_000, backfill_id=backfill_id, backfill=True))
    if not listed:
        what = f"backfill {backfill_id}" if AIRFLOW_V_3 else "backfill-type runs"
        raise SpecError(f"DAG {dag_id!r} has no {what} (airflow backfill create / airflow dags backfill makes them)")
    return listed


def run_info(spec: BackfillSpec, dag_id: str, run_id: str | None) -> RunInfo | None:
    """The run (default: the latest) and its range: the plan's XCom, else its params or data interval."""
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    if run_id is None:
        latest = runs(dag_id, limit=1)
        if not latest:
            return None
        run_id = latest[0]["run_id"]
    with _session() as session:
        dr = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if dr is None:
            raise SpecError(f"DAG {dag_id!r} has no run {run_id!r}")
        state = str(getattr(dr.state, "value", dr.state) or "")
        started, ended = dr.start_date, dr.end_date
        conf = dr.conf or {}
        interval = (dr.data_interval_start, dr.data_interval_end)
        run_type = str(getattr(dr.run_type, "value", dr.run_type))
    plan = plan_summary(dag_id, run_id)
    descriptors = None
    backfill_key = (plan or {}).get("backfill_key")
    if plan:
        start, end, gran = plan.get("start"), plan.get("end"), plan.get("granularity")
        if not plan.get("dry_run"):  # a dry run returns no chunks: show its computed plan instead
            value = _xcom(dag_id, run_id, PLAN_TASK, "return_value")
            descriptors = value if isinstance(value, list) else None
    else:
        start, end, gran = _range_without_plan(spec, conf, run_type, interval)
    return RunInfo(
        run_id=run_id,
        state=state,
        start=_parse(start),
        end=_parse(end),
        granularity=gran,
        started_at=started,
        ended_at=ended,
        descriptors=descriptors,
        backfill_key=backfill_key,
    )


def _range_without_plan(spec, conf, run_type, interval):
    """Before the plan task ran: the same range resolution the plan will do (minus the watermark clip)."""
    from airflow_backfill_provider.core.exceptions import BackfillError
    from airflow_backfill_provider.plan.planning import resolve_range

    try:
        lo, hi = resolve_range(
            spec,
            param_start=conf.get("start") or None,
            param_end=conf.get("end") or None,
            run_type=run_type,
            interval_start=interval[0],
            interval_end=interval[1],
        )
    except BackfillError:
        return None, None, None
    return lo, hi, conf.get("granularity") or spec.granularity


def _parse(value):
    if value is None or isinstance(value, dt.datetime):
        return value
    import pendulum

    return pendulum.parse(str(value))


def plan_summary(dag_id: str, run_id: str) -> dict | None:
    """The plan task's XCom 'plan' (range after watermark clipping, granularity, dry_run), or None."""
    value = _xcom(dag_id, run_id, PLAN_TASK, "plan")
    return value if isinstance(value, dict) else None


def _xcom(dag_id: str, run_id: str, task_id: str, key: str):
    with _session() as session:
        if AIRFLOW_V_3:
            from airflow.models.xcom import XComModel
            from sqlalchemy import select

            value = session.scalar(
                select(XComModel.value).where(
                    XComModel.dag_id == dag_id,
                    XComModel.run_id == run_id,
                    XComModel.task_id == task_id,
                    XComModel.key == key,
                    XComModel.map_index == -1,
                )
            )
            if isinstance(value, str):  # stored JSON-encoded
                try:
                    value = json.loads(value)
                except ValueError:
                    return None
            return value
        from airflow.models.xcom import XCom  # Airflow 2.11

        return XCom.get_one(key=key, task_id=task_id, dag_id=dag_id, run_id=run_id, session=session)


def task_states(dag_id: str, run_id: str, descriptors: list | None = None) -> list[TaskState]:
    """Every mapped instance of the chunk task in the run, labelled by its chunk id: one query."""
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    c = TaskInstance.__table__.c
    with _session() as session:
        rows = session.execute(
            select(c.map_index, c.rendered_map_index, c.state, c.start_date, c.end_date, c.try_number).where(
                c.dag_id == dag_id, c.run_id == run_id, c.task_id == CHUNK_TASK, c.map_index >= 0
            )
        ).all()
    labels: dict[int, str] = {}
    if any(not r[1] for r in rows):
        # a task instance gets its label (the chunk id) when it runs; before that, map index i is the
        # plan's i-th descriptor (one more query, only while some chunks have not started)
        if descriptors is None:
            descriptors = _xcom(dag_id, run_id, PLAN_TASK, "return_value") or []
        labels = {i: str(d.get("chunk_id")) for i, d in enumerate(descriptors) if isinstance(d, dict)}
    return [
        TaskState(chunk_id=r[1] or labels.get(r[0], str(r[0])), state=str(getattr(r[2], "value", r[2])) if r[2] else None,
                  start_date=r[3], end_date=r[4], try_number=r[5] or 0)
        for r in rows
    ]  # fmt: skip


def collect(dag_id: str, run_id: str | None = None, *, spec: BackfillSpec | None = None):
    """One run's :class:`~airflow_backfill_provider.observe.progress.Progress`: metadata DB + destination (read-only)."""
    from airflow_backfill_provider.connections import close_all, connect
    from airflow_backfill_provider.observe.progress import build_progress, read_failures, read_ledger, read_validation

    spec = spec or spec_for_dag(dag_id)
    run = run_info(spec, dag_id, run_id)
    states = task_states(dag_id, run.run_id, run.descriptors) if run else []
    # outside a task (the page, the status CLI): Airflow 3's task-side lookup would miss metadata-DB connections
    conn = connect(spec.destination_conn_id, application_name=f"backfill:{dag_id}:progress", readonly=True,
                   statement_timeout_s=30, outside_task=True)  # fmt: skip
    try:
        # this backfill's rows: by the key its plan recorded; before the plan ran, those this DAG wrote
        rows = read_ledger(conn, spec, backfill_key=run.backfill_key if run else None, dag_id=dag_id)
        validation = read_validation(conn, spec, dag_id=dag_id, run_id=run.run_id if run else None)
        failures = read_failures(conn, spec, dag_id=dag_id, run_id=run.run_id if run else None)
    finally:
        conn.rollback()
        close_all(conn)
    return build_progress(spec, dag_id=dag_id, run=run, ledger_rows=rows, task_states=states, validation=validation,
                          failures=failures)  # fmt: skip


def collect_backfill(dag_id: str, backfill_id: str | None = None, *, spec: BackfillSpec | None = None):
    """A whole backfill's :class:`~airflow_backfill_provider.observe.progress.Progress` (default: the DAG's newest
    backfill): every run's chunks, totals, ETA and failure reasons; its runs in logical-date order.

    Per run: its range (run_info), and one destination query each for its failures and validation; one metadata
    query per run for its chunk task states; the ledger once (one backfill key)."""
    from airflow_backfill_provider.connections import close_all, connect
    from airflow_backfill_provider.observe.progress import (
        RunInputs,
        build_backfill,
        read_failures,
        read_ledger,
        read_validation,
    )

    spec = spec or spec_for_dag(dag_id)
    backfill_id = backfill_id or latest_backfill(dag_id)
    if backfill_id is None:
        raise SpecError(f"DAG {dag_id!r} has no backfill (airflow backfill create makes one); drop --backfill")
    listed = backfill_runs(dag_id, backfill_id)
    infos = [(r, run_info(spec, dag_id, r["run_id"])) for r in listed]
    # outside a task (the page, the status CLI): Airflow 3's task-side lookup would miss metadata-DB connections
    conn = connect(spec.destination_conn_id, application_name=f"backfill:{dag_id}:progress", readonly=True,
                   statement_timeout_s=30, outside_task=True)  # fmt: skip
    try:
        key = next((i.backfill_key for _, i in infos if i is not None and i.backfill_key), None)
        rows = read_ledger(conn, spec, backfill_key=key, dag_id=dag_id)
        inputs = [
            RunInputs(
                run=info,
                logical_date=r["logical_date"],
                task_states=task_states(dag_id, info.run_id, info.descriptors),
                failures=read_failures(conn, spec, dag_id=dag_id, run_id=info.run_id),
                validation=read_validation(conn, spec, dag_id=dag_id, run_id=info.run_id),
            )
            for r, info in infos
            if info is not None
        ]
    finally:
        conn.rollback()
        close_all(conn)
    shown_id = None if backfill_id == "runs" else backfill_id
    return build_backfill(spec, dag_id=dag_id, backfill_id=shown_id, runs=inputs, ledger_rows=rows)


def collect_view(
    dag_id: str,
    run_id: str | None = None,
    *,
    backfill_id: str | None = None,
    whole: bool | None = None,
    spec: BackfillSpec | None = None,
):
    """What the page and ``status`` show: a run, or a whole backfill.

    ``whole`` True: the backfill ``backfill_id`` (default: the run's, else the newest); False: the run only;
    None (default): the whole backfill when no run is asked for and the latest run belongs to a backfill."""
    spec = spec or spec_for_dag(dag_id)
    progress = _collect_view(dag_id, run_id, backfill_id=backfill_id, whole=whole, spec=spec)
    if not pool_exists(spec.pool):
        from airflow_backfill_provider.observe.progress import missing_pool_problem

        missing_pool_problem(progress, spec.pool)
    return progress


def pool_exists(name: str) -> bool:
    """Whether the Airflow pool exists. Read here, outside tasks: on Airflow 3 a task cannot read pools, so the
    plan task can only hint at a missing one; the page and ``status`` name it with the fix."""
    from airflow.models.pool import Pool
    from sqlalchemy import select

    with _session() as session:
        return session.scalar(select(Pool.id).where(Pool.pool == name)) is not None


def _collect_view(dag_id, run_id, *, backfill_id, whole, spec):
    if whole is None:
        whole = False
        if run_id is None and backfill_id is None:
            latest = runs(dag_id, limit=1)
            backfill_id = backfill_of(latest[0]) if latest else None
            whole = backfill_id is not None
        elif backfill_id is not None:
            whole = True
    if whole:
        if backfill_id is None and run_id is not None:
            found = [r for r in runs(dag_id, limit=100_000) if r["run_id"] == run_id]
            backfill_id = backfill_of(found[0]) if found else None
            if backfill_id is None:
                raise SpecError(f"run {run_id!r} of DAG {dag_id!r} belongs to no backfill")
        return collect_backfill(dag_id, backfill_id, spec=spec)
    return collect(dag_id, run_id, spec=spec)
