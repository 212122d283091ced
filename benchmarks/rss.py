"""Run one measurement in a child process and read that child's own peak RSS.

Each measurement gets a fresh interpreter, so one path's memory (say, the naive loop's fetchall) never
inflates another's figure. The parent reaps the child with ``os.wait4``, whose rusage is that child's
alone (``ru_maxrss``, KiB on Linux), unlike ``RUSAGE_CHILDREN``, which is the maximum over all children.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: measurement name -> "module:function"; imported only in the child
TASKS = {
    "physical": "benchmarks.baselines:physical_copy",
    "reference": "benchmarks.baselines:reference_upsert",
    "naive": "benchmarks.baselines:naive_loop",
    "generic_transfer": "benchmarks.baselines:generic_transfer",
    "ours": "benchmarks.ours:our_transfer",
    "ours_batch": "benchmarks.ours:our_batch",
    "idle": "benchmarks.ours:idle",
}

REPO_ROOT = Path(__file__).resolve().parent.parent


class ChildFailed(RuntimeError):
    pass


def run_isolated(task: str, kwargs: dict, *, env: dict | None = None, python: str | None = None) -> dict:
    """Run ``TASKS[task](**kwargs)`` in a child; return its result plus ``peak_rss_mb``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        args_path, out_path, log_path = (Path(tmp) / n for n in ("args.json", "out.json", "stderr.log"))
        args_path.write_text(json.dumps(kwargs))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [python or sys.executable, "-m", "benchmarks.rss", task, str(args_path), str(out_path)],
                env=child_env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not out_path.exists():
            tail = log_path.read_text(errors="replace")[-4000:]
            raise ChildFailed(f"measurement {task!r} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out_path.read_text())
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return result


def _child_main(task: str, args_path: str, out_path: str) -> None:
    module, _, func = TASKS[task].partition(":")
    fn = getattr(importlib.import_module(module), func)
    result = fn(**json.loads(Path(args_path).read_text()))
    Path(out_path).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    _child_main(*sys.argv[1:4])
