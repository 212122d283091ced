"""CPU pinning with ``taskset`` (util-linux): two "hosts" on one machine for the source-impact bench.

The source cluster and its OLTP client get their own core(s); everything else (destination, Airflow, the
backfill's task processes, the bench itself) gets the others. Pinning a process tree covers the processes it
forks later (a postmaster's new backends, a scheduler's new task processes): Linux children inherit the
parent's affinity. ``taskset -a`` pins every thread of a process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def cpulist(cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True)
class Pinning:
    """``source``/``rest``: the core lists of the two sides; None when the machine cannot be split."""

    available: tuple[int, ...]
    source: tuple[int, ...] | None
    rest: tuple[int, ...] | None
    why_not: str = ""

    @property
    def active(self) -> bool:
        return self.source is not None

    def describe(self) -> str:
        if not self.active:
            return f"NOT pinned ({self.why_not}): the 'separate' layout runs unpinned, like 'shared'"
        return (
            f"cores {cpulist(self.available)}: source cluster + pgbench -> {cpulist(self.source)}; "
            f"destination cluster, Airflow (scheduler, workers, triggerer, api-server, dag-processor), "
            f"the backfill's task processes and this bench -> {cpulist(self.rest)}"
        )


def plan() -> Pinning:
    """Split the cores this process may use: the source side gets the upper half (at least one core)."""
    avail = tuple(sorted(os.sched_getaffinity(0)))
    if shutil.which("taskset") is None:
        return Pinning(avail, None, None, "taskset not found: install util-linux")
    if len(avail) < 2:
        return Pinning(avail, None, None, f"only {len(avail)} core available, 2 are needed")
    n_src = max(1, len(avail) // 2)
    return Pinning(avail, avail[len(avail) - n_src :], avail[: len(avail) - n_src])


def prefix(cpus) -> list[str]:
    """Argv prefix that starts a program on ``cpus`` (nothing when None)."""
    return ["taskset", "-c", cpulist(cpus)] if cpus else []


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def pin_tree(pid: int, cpus) -> int:
    """``taskset -a -p -c cpus`` on ``pid``, every descendant and all their threads; returns how many
    processes were pinned (processes that ended meanwhile are skipped)."""
    n = 0
    for p in tree(pid):
        proc = subprocess.run(["taskset", "-a", "-p", "-c", cpulist(cpus), str(p)], capture_output=True, text=True)
        n += proc.returncode == 0
    return n


def allowed(pid: int) -> str | None:
    """The core list a process may run on, as the kernel reports it (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def allowed_in_tree(pid: int) -> set[str]:
    """The distinct core lists of ``pid``'s whole tree (to check that new children inherited a pin)."""
    return {a for p in tree(pid) if (a := allowed(p)) is not None}
