"""Run a whole backfill DAG in its own process with dag.test(), like a worker that can be signalled.

``run_dag.py DAGS_DIR SPEC_JSON CONF_JSON EXECUTION_TIMEOUT_S`` (0: none). Writes a DAG file for the spec into
DAGS_DIR (dag.test() on Airflow 3 serializes the DAGs folder), runs it, and prints as its last stdout line
``RESULT {"state": ..., "tis": [{"task_id", "map_index", "state", "try_number"}], "escaped": null}``;
"escaped" names an interrupt that ended dag.test() itself (Airflow 2.11 lets BaseException out of it).
Used by the interrupt tests: execution_timeout and SIGTERM arrive in this process, mid-chunk.
"""

import faulthandler
import json
import os
import runpy
import signal
import sys
from pathlib import Path

DAG_FILE = """\
import datetime as dt, json, pathlib
from airflow_backfill_provider.factory import build_backfill_dag
_here = pathlib.Path(__file__).parent
_timeout = float((_here / "timeout_s").read_text())
dag = build_backfill_dag(
    json.loads((_here / "spec.json").read_text()),
    default_args={"execution_timeout": dt.timedelta(seconds=_timeout)} if _timeout > 0 else {},
)
"""


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for our stacks when we hang
    dags, spec, conf, timeout_s = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    (dags / "spec.json").write_text(spec)
    (dags / "timeout_s").write_text(timeout_s)
    (dags / "interrupt_dag.py").write_text(DAG_FILE)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)  # before Airflow is imported
    dag = runpy.run_path(str(dags / "interrupt_dag.py"))["dag"]
    escaped = None
    try:
        run = dag.test(run_conf=conf)
    except BaseException as err:  # noqa: BLE001 - Airflow 2.11's dag.test() only catches Exception around a task:
        if isinstance(err, Exception):  # an interrupt ends it, after the task instance recorded its new state
            raise
        from airflow.models.dagrun import DagRun

        escaped = type(err).__name__
        run = max(DagRun.find(dag_id=dag.dag_id), key=lambda r: r.id)
    tis = [
        {
            "task_id": ti.task_id,
            "map_index": ti.map_index,
            "state": str(getattr(ti.state, "value", ti.state)),
            "try_number": ti.try_number,
        }
        for ti in run.get_task_instances()
    ]
    state = str(getattr(run.state, "value", run.state))
    print("RESULT " + json.dumps({"state": state, "tis": tis, "escaped": escaped}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
