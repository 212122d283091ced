"""The only module that checks Airflow's version.

Everything Airflow-specific the rest of the package needs is imported from here, so 3.x and 2.11
differences live in one place. ``common.compat.sdk`` already maps most names on both versions.
"""

from __future__ import annotations

from airflow import __version__ as AIRFLOW_VERSION  # noqa: N812
from packaging.version import Version

AIRFLOW_V_3 = Version(Version(AIRFLOW_VERSION).base_version) >= Version("3.0.0")

from airflow.providers.common.compat.sdk import (  # noqa: E402
    AirflowException,
    AirflowFailException,
    AirflowSkipException,
    BaseHook,
    BaseOperator,
    Param,
    TaskDeferred,
)

if AIRFLOW_V_3:
    from airflow.sdk import DAG, Asset, Context, CronDataIntervalTimetable
    from airflow.sdk.exceptions import AirflowTaskTerminated, AirflowTaskTimeout
    from airflow.triggers.base import BaseTrigger, TriggerEvent
else:  # Airflow 2.11
    from airflow.datasets import Dataset as Asset  # type: ignore[no-redef]
    from airflow.exceptions import AirflowTaskTerminated, AirflowTaskTimeout  # type: ignore[no-redef]
    from airflow.models.dag import DAG  # type: ignore[no-redef,assignment]
    from airflow.timetables.interval import CronDataIntervalTimetable  # type: ignore[no-redef,assignment]
    from airflow.utils.context import Context  # type: ignore[no-redef,assignment,attr-defined]
    from airflow.triggers.base import BaseTrigger, TriggerEvent  # type: ignore[no-redef]

__all__ = [
    "AIRFLOW_V_3",
    "AIRFLOW_VERSION",
    "AirflowException",
    "AirflowFailException",
    "AirflowSkipException",
    "AirflowTaskTerminated",
    "AirflowTaskTimeout",
    "Asset",
    "BaseHook",
    "BaseOperator",
    "BaseTrigger",
    "Context",
    "CronDataIntervalTimetable",
    "DAG",
    "INTERRUPTS",
    "Param",
    "SIGTERM_RAISES",
    "TaskDeferred",
    "TriggerEvent",
    "aget_connection",
    "get_connection_outside_task",
    "run_type_of",
]


#: execution_timeout (SIGALRM) and SIGTERM on 2.11: BaseException subclasses on both versions today;
#: listed so a chunk re-raises them unchanged (retried by Airflow) even if that ever changes.
INTERRUPTS: tuple[type[BaseException], ...] = (AirflowTaskTimeout, AirflowTaskTerminated)

#: On SIGTERM, 2.11 calls ``on_kill`` and then raises AirflowTaskTerminated (retried); 3.x only calls
#: ``on_kill`` (and fails AirflowTaskTerminated without retry), so there the operator interrupts itself.
SIGTERM_RAISES = not AIRFLOW_V_3


async def aget_connection(conn_id: str):
    """Resolve an Airflow connection from async code (a trigger) without blocking the event loop.

    3.x: the Task SDK's ``BaseHook.aget_connection`` (the sync call from a trigger's event loop needs
    the greenback portal). 2.11: the sync lookup (metadata DB / secrets backend) in a thread.
    """
    getter = getattr(BaseHook, "aget_connection", None)
    if getter is not None:
        return await getter(conn_id)
    import asyncio

    return await asyncio.to_thread(BaseHook.get_connection, conn_id)


def get_connection_outside_task(conn_id: str):
    """An Airflow connection for code that runs outside a task: the ``status`` CLI, the api-server's page.

    Airflow 3's hook lookup (``BaseHook.get_connection``, the Task SDK's) reads the metadata database only in a
    task (through the API server) or in a process Airflow marked as a server (api-server, scheduler); in any
    other process, such as ``python -m airflow_backfill_provider status``, it sees ``AIRFLOW_CONN_*`` variables
    and external secrets backends only, so a connection made with ``airflow connections add`` is "not defined".
    ``Connection.get_connection_from_secrets`` is the lookup ``airflow connections get`` uses: every configured
    secrets backend, the metadata database included. 2.11: the hook's lookup already does that.
    """
    if AIRFLOW_V_3:
        from airflow.models.connection import Connection

        return Connection.get_connection_from_secrets(conn_id)
    return BaseHook.get_connection(conn_id)


def run_type_of(context) -> str:
    """'manual', 'scheduled', 'backfill' or 'asset_triggered', as a plain string on both versions."""
    dag_run = context.get("dag_run")
    run_type = getattr(dag_run, "run_type", None)
    return str(getattr(run_type, "value", run_type) or "manual")


def pool_exists(name: str) -> bool | None:
    """Whether the Airflow pool ``name`` exists; None when this process cannot tell.

    Airflow 3 tasks cannot: the ORM is blocked in tasks, and neither the Task SDK nor the execution API has a
    pool call (the REST API would need credentials a task does not have). On 2.11 tasks may use the ORM.
    """
    if AIRFLOW_V_3:
        return None
    from airflow.models.pool import Pool

    try:
        return Pool.get_pool(name) is not None
    except Exception:  # noqa: BLE001 - no metadata DB here (a task run outside Airflow): cannot tell
        return None


#: Airflow 3.3 takes a backoff multiplier (float); 2.11 takes a bool (doubling).
EXPONENTIAL_BACKOFF = 2.0 if AIRFLOW_V_3 else True
