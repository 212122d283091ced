"""Source impact: pgbench on the source while a backfill runs under a real scheduler (issues 17 and 23).

    make bench-source                         # = .venv/bin/python -m benchmarks.source_impact (full size)
    make bench-source ROWS=20000 BENCH_ARGS="--days 30 --phase-seconds 3 --layouts separate"   # a smoke run

Two private PostgreSQL clusters (benchmarks/pgcluster.py: initdb into .bench_pg/, run as the ``postgres``
user, each on its own port, stopped and removed at the end): the **source cluster** and a **host cluster**
that holds the destination and Airflow's metadata database. Two layouts:

- **separate** (pinned): two hosts emulated on one machine with ``taskset`` (benchmarks/cpuset.py): the
  source cluster (started with ``taskset -c``, so every backend inherits it) and pgbench get their own
  core(s); the host cluster, Airflow (api-server, scheduler and its task processes, dag-processor,
  triggerer) and this bench get the others (``taskset -a -p`` over each running process tree). On a
  machine with fewer than 2 usable cores, or without ``taskset``, this is said in the output and the
  layout runs unpinned.
- **shared**: the source database is on the host cluster, next to the destination; no pinning.

The source holds the time-scattered ``orders_wide`` table (benchmarks/scattered.py) and pgbench's TPC-B-like
tables (``-s --scale``). pgbench ``-c 4 -j 2`` runs in back-to-back 3-second runs with per-transaction logs
(``-l``), so TPS, average and p99 latency can be cut exactly at the phase boundaries: **before** (no
backfill), **during** (the whole backfill of the table through a real scheduler: LocalExecutor, 4-slot
pool, triggerer), **after**. Each layout runs the backfill (each into an empty destination):

- with pgbench, throttle **off** (``max_latency_ratio: null, watch_reads: false``) and **on** (the
  DEFAULT spec: no throttle key at all: the latency budget and the read watch as a new spec has them);
  the source's quiet baseline is learned from pgbench during "before" (what the baseline table holds on a
  source the provider already knows);
- on an **idle** source (no pgbench), off and on: the default spec's cost when there is nothing to protect.

A last scenario (separate layout, default spec) starts the backfill on a quiet source and runs pgbench from
~25% to ~60% (``--mid-load-from/--mid-load-to``) of the backfill's expected time: the idle "off" run's time
(DAG run start to end) of the same layout measured earlier in this run. Phases are cut at the DAG run's own
start and end (metadata database); one untimed warm-up run over an empty day comes first. Every second it counts the run's task instances
running, deferred and up for retry (metadata database) and the chunks whose read is paused (the read watch's
"read paused"/"read resumed" lines in the chunk task logs, timestamped); the ledger's ``waited_load_s``
(deferred waits plus read pauses) and the chunks' "read paused N time(s), X s in all" lines are summed.

Targets (issue 23; a full-size run on a quiet machine is what they are about): pinned layout, default spec:
pgbench p99 during / before <= 1.2 and TPS during / before >= 0.85; idle source: default spec <= 1.25x the
unthrottled time; mid-load: chunks wait or pause while the load runs, none waits or pauses from
``RESUME_S`` after it, and the run completes. Everything is printed as ratios from this one run (and
written as JSON). Nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2

from benchmarks import cpuset, scattered
from benchmarks.pgcluster import PrivateCluster, pg_bin
from benchmarks.seed import DEFAULT_START, Databases

FULL_ROWS = 1_500_000
#: "resume within seconds": no chunk deferred or paused from this long after the load stopped
RESUME_S = 10.0
#: the throttle "off": no latency budget, no read watch (the active-session cap stays, as for every spec)
OFF = {"max_latency_ratio": None, "watch_reads": False}
PAUSED = "read paused (the source waits on its socket)"
RESUMED = ": read resumed:"
RELEASED = ": read paused for "  # the pause bound: the chunk reads on to its end
SUMMARY = re.compile(r"read paused (\d+) time\(s\), ([\d.]+) s in all")


def log(msg: str) -> None:
    print(f"[bench-source {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Oltp:
    """pgbench -c 4 -j 2 in back-to-back short runs with per-transaction logs, in a thread, until stop()."""

    def __init__(
        self, url: str, folder: Path, step_s: int = 3, clients: int = 4, jobs: int = 2, cpus: tuple | None = None
    ):
        self.url, self.folder, self.step_s, self.clients, self.jobs = url, folder, step_s, clients, jobs
        self.cpus = cpus  # pinned with taskset -c (the source's side in the separate layout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.runs = 0
        self.errors: list[str] = []

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.runs += 1
            proc = subprocess.run(
                [
                    *cpuset.prefix(self.cpus),
                    pg_bin("pgbench"),
                    "-n",
                    "-c",
                    str(self.clients),
                    "-j",
                    str(self.jobs),
                    "-T",
                    str(self.step_s),
                    "-l",
                    "--log-prefix",
                    str(self.folder / f"pgb{self.runs:05d}"),
                    self.url,
                ],
                cwd=self.folder,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                self.errors.append(proc.stderr[-300:])
                if len(self.errors) > 3:
                    return

    def start(self) -> "Oltp":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.step_s + 60)

    def transactions(self) -> list[tuple[float, float]]:
        """(completion epoch seconds, latency ms) of every logged transaction."""
        out = []
        for path in self.folder.glob("pgb*"):
            for line in path.read_text().splitlines():
                f = line.split()
                if len(f) >= 6 and f[2] != "skipped":
                    out.append((int(f[4]) + int(f[5]) / 1e6, int(f[2]) / 1000.0))
        return out


def phase_stats(txns: list[tuple[float, float]], start: float, end: float) -> dict:
    lat = sorted(ms for t, ms in txns if start <= t < end)
    if not lat or end <= start:
        return {"seconds": round(end - start, 1), "transactions": 0}
    return {
        "seconds": round(end - start, 1),
        "transactions": len(lat),
        "tps": len(lat) / (end - start),
        "avg_ms": statistics.fmean(lat),
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def quiet_baseline(src_url: str, dst_url: str, key: str, windows: int = 3) -> dict:
    """Learn the source's baseline (lowest of a few windows) into the destination's baseline table."""
    from airflow_backfill_provider.throttle.loadsignal import learn_baseline, sample_window

    src = psycopg2.connect(src_url, application_name="backfill:bench:baseline")
    dst = psycopg2.connect(dst_url)
    try:
        for _ in range(windows):
            b = learn_baseline(dst, "public.backfill_load_baseline", key, sample_window(src, window_s=1.0))
    finally:
        src.close()
        dst.close()
    return b.to_dict()


def specs() -> list[dict]:
    """Four DAGs: {separate, shared} x {throttle off, on = the default spec}; same table, same chunking."""
    out = []
    for layout in ("separate", "shared"):
        for mode in ("off", "on"):
            extra = {"throttle": dict(OFF)} if mode == "off" else {}  # "on": no throttle key, the defaults
            out.append(
                scattered.spec_dict(
                    src_conn=f"bench_src_{layout}",
                    dst_conn="backfill_dest_pg",
                    name=f"src_{layout}_{mode}",
                    validation={"enabled": False},
                    **extra,
                )
            )
    return out


class Hosts:
    """Which cores each side runs on, per layout: pinned for 'separate' (when the machine allows), all
    cores for 'shared'. Re-pins the running process trees when the layout changes."""

    def __init__(self, pinning: cpuset.Pinning, source: PrivateCluster, host: PrivateCluster):
        self.pinning, self.source, self.host = pinning, source, host
        self.pgbench_cpus: tuple[int, ...] | None = None

    def apply(self, layout: str, sb) -> dict:
        p = self.pinning
        pinned = layout == "separate" and p.active
        if not p.active:
            self.pgbench_cpus = None
            return {"pinned": False, "why_not": p.why_not}
        src, rest = (p.source, p.rest) if pinned else (p.available, p.available)
        self.source.pin(src)
        self.host.pin(rest)
        cpuset.pin_tree(os.getpid(), rest)  # this bench, its threads and its children: Airflow's services
        self.pgbench_cpus = src if pinned else None
        return self.check(sb) | {"pinned": pinned}

    def check(self, sb) -> dict:
        """The core lists the kernel reports for each side's processes (their whole trees)."""
        airflow: set[str] = set()
        for proc in sb.procs.values():
            airflow |= cpuset.allowed_in_tree(proc.pid)
        return {
            "source_cluster": sorted(cpuset.allowed_in_tree(self.source.postmaster_pid)),
            "host_cluster": sorted(cpuset.allowed_in_tree(self.host.postmaster_pid)),
            "airflow": sorted(airflow),
            "bench": cpuset.allowed(os.getpid()),
            "pgbench": cpuset.cpulist(self.pgbench_cpus) if self.pgbench_cpus else cpuset.allowed(os.getpid()),
        }


def _epoch(line: str) -> tuple[float, str] | None:
    """(epoch seconds, message) of one task log line: Airflow 3 writes JSON lines with a timestamp."""
    try:
        rec = json.loads(line)
        ts, msg = rec.get("timestamp"), str(rec.get("event", ""))
    except (ValueError, AttributeError):
        m = re.match(r"\[?(\d{4}-\d\d-\d\d[T ][\d:.]+(?:Z|[+-]\d\d:?\d\d)?)", line)
        if not m:
            return None
        ts, msg = m.group(1), line
    if not ts:
        return None
    try:
        t = dt.datetime.fromisoformat(str(ts).replace(" ", "T"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp(), msg


def read_pauses(log_files: list[Path]) -> dict:
    """Paused intervals of every chunk's read (from the read watch's log lines) and the chunks' summaries."""
    intervals: list[tuple[float, float]] = []
    pauses = 0
    paused_s = 0.0
    chunks_paused = 0
    for path in log_files:
        opened = None
        last = None
        for line in path.read_text(errors="replace").splitlines():
            got = _epoch(line)
            if got is None:
                continue
            t, msg = got
            last = t
            if PAUSED in msg and opened is None:
                opened = t
            elif (RESUMED in msg or RELEASED in msg) and opened is not None:
                intervals.append((opened, t))
                opened = None
            m = SUMMARY.search(msg)
            if m:
                if opened is not None:  # the stream ended while paused
                    intervals.append((opened, t))
                    opened = None
                pauses += int(m.group(1))
                paused_s += float(m.group(2))
                chunks_paused += int(m.group(1)) > 0
        if opened is not None and last is not None:
            intervals.append((opened, last))
    return {"intervals": intervals, "pauses": pauses, "paused_s": round(paused_s, 1), "chunks_paused": chunks_paused}


def ledger_waits(dst_url: str, run_id: str) -> dict:
    """The ledger's waited_load_s of the run's chunks (deferred waits plus read pauses)."""
    conn = psycopg2.connect(dst_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*), count(*) FILTER (WHERE waited_load_s > 0), coalesce(sum(waited_load_s), 0) "
                "FROM public.backfill_ledger WHERE run_id = %s",
                (run_id,),
            )
            n, waited, total = cur.fetchone()
    except psycopg2.Error as err:
        return {"error": str(err).strip()[:200]}
    finally:
        conn.close()
    return {"chunks": n, "chunks_waited": waited, "waited_load_s": round(float(total), 1)}


def run_scenario(
    sb, args, hosts: Hosts, layout: str, mode: str, src_url: str, dst_url: str, tmp: Path, kind: str = "oltp", **kw
) -> dict:
    """``kind``: "oltp" (pgbench before, during and after), "idle" (no pgbench) or "mid" (pgbench from
    ``kw['load_from']`` to ``kw['load_to']`` seconds after the DAG run started). The phases are cut at the
    DAG run's own start and end (metadata database), not at the trigger."""
    dag_id = f"backfill_src_{layout}_{mode}"
    scattered.fresh_destination(dst_url)
    if mode == "on":
        # the learned baseline is kept per source connection id; forget it: each scenario learns its own
        conn = psycopg2.connect(dst_url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS public.backfill_load_baseline")
        conn.close()
    start = DEFAULT_START.date()
    conf = {"start": start.isoformat(), "end": (start + dt.timedelta(days=args.days)).isoformat(), "reprocess": True}
    oltp = Oltp(src_url, tmp / f"{layout}_{mode}_{kind}", cpus=hosts.pgbench_cpus)
    marks: dict[str, float] = {}
    series: list[tuple[float, int, int, int]] = []  # (epoch, running, deferred, waiting to retry)
    result: dict = {"layout": layout, "throttle": mode, "kind": kind, "mid_load": kind == "mid"}
    sb.wait_idle()
    if kind == "oltp":
        oltp.start()
        marks["before"] = time.time()
        if mode == "on":
            time.sleep(2)  # pgbench running: learn the quiet baseline from the OLTP as it is without us
            result["baseline"] = quiet_baseline(src_url, dst_url, f"bench_src_{layout}")
        time.sleep(max(0.0, args.phase_seconds - (time.time() - marks["before"])))
    elif kind == "mid":
        # the baseline needs transactions to measure: learn it from a short pgbench run, then stop it
        warm = Oltp(src_url, tmp / f"{layout}_{mode}_baseline", cpus=hosts.pgbench_cpus).start()
        time.sleep(2)
        result["baseline"] = quiet_baseline(src_url, dst_url, f"bench_src_{layout}")
        warm.stop()
        time.sleep(2)  # let the source settle before the backfill starts on a quiet source
    marks["during"] = time.time()
    run_id = sb.start_run(dag_id, conf)
    load_on_at = load_off_at = run_start = None
    affinity: set[str] = set()

    def poll():
        nonlocal load_on_at, load_off_at, run_start
        now = time.time()
        if run_start is None:
            run_start = sb.run_started(dag_id, run_id)
        states = sb.states_now(dag_id, run_id)
        series.append((now, states.get("running", 0), states.get("deferred", 0), states.get("up_for_retry", 0)))
        if len(series) % 5 == 1:  # the task processes the scheduler started since: did they inherit the pin?
            for proc in sb.procs.values():
                affinity.update(cpuset.allowed_in_tree(proc.pid))
        if kind != "mid" or run_start is None:
            return
        if load_on_at is None and now - run_start >= kw["load_from"]:
            log(f"{dag_id}: starting pgbench mid-backfill ({now - run_start:.1f} s after the run started)")
            oltp.start()
            load_on_at = time.time()
        elif load_on_at and load_off_at is None and now - run_start >= kw["load_to"]:
            oltp.stop()
            load_off_at = time.time()
            log(f"{dag_id}: pgbench stopped ({load_off_at - run_start:.1f} s after the run started)")

    figures = sb.wait_run(dag_id, run_id, timeout=args.timeout, on_poll=poll)
    marks["after"] = time.time()
    t_start, t_end = figures["start"].timestamp(), figures["end"].timestamp()  # the DAG run's own
    if kind == "mid" and load_on_at and not load_off_at:
        oltp.stop()
        load_off_at = time.time()
    elif kind == "oltp":
        time.sleep(args.phase_seconds)
        marks["end"] = time.time()
        oltp.stop()
    pauses = read_pauses(sb.task_logs(dag_id, run_id))
    result.update(
        backfill_seconds=figures["run_seconds"],
        wall_seconds=round(marks["after"] - marks["during"], 1),  # trigger to completion seen
        run_state=figures["state"],
        chunks=figures["chunks"],
        rows_loaded=scattered.count(dst_url),
        pgbench_runs=oltp.runs,
        pgbench_errors=oltp.errors[:2],
        max_deferred_at_once=max((d for _, _, d, _ in series), default=0),
        retried=figures.get("retried", 0),  # task instances on a second or later try (a failed try before)
        read_pauses=pauses["pauses"],
        paused_s=pauses["paused_s"],
        chunks_paused=pauses["chunks_paused"],
        ledger=ledger_waits(dst_url, run_id),
        airflow_cores_seen=sorted(affinity),
    )
    if kind == "mid":
        result["timeline"] = timeline(series, pauses["intervals"], t_start, load_on_at, load_off_at)
        result.update(mid_summary(result["timeline"], t_end - t_start))
        result["load_window"] = result["timeline"]["load"]
        result["oltp_during"] = phase_stats(oltp.transactions(), load_on_at or 0, load_off_at or 0)
    elif kind == "oltp":
        txns = oltp.transactions()
        result["oltp"] = {
            "before": phase_stats(txns, marks["before"], t_start),
            "during": phase_stats(txns, t_start, t_end),
            "after": phase_stats(txns, t_end, marks["end"]),
        }
    log(f"{dag_id} ({kind}): {json.dumps({k: v for k, v in result.items() if k != 'timeline'}, default=str)}")
    return result


def timeline(series, intervals, t0: float, on: float | None, off: float | None) -> dict:
    """Per second since ``t0`` (the run's start): task instances running, deferred, chunk reads paused."""
    n = int(max((t for t, *_ in series), default=t0) - t0) + 1
    running, deferred, paused, retry = [0] * n, [0] * n, [0] * n, [0] * n
    for t, r, d, u in series:
        i = int(t - t0)
        if 0 <= i < n:
            running[i], deferred[i], retry[i] = max(running[i], r), max(deferred[i], d), max(retry[i], u)
    for a, b in intervals:
        for i in range(max(0, int(a - t0)), min(n, int(b - t0) + 1)):
            paused[i] += 1
    load = [round(on - t0, 1) if on else None, round(off - t0, 1) if off else None]
    return {"running": running, "deferred": deferred, "paused": paused, "retry": retry, "load": load}


def mid_summary(tl: dict, wall: float) -> dict:
    on, off = tl["load"]
    d, p = tl["deferred"], tl["paused"]
    n = len(d)

    def span(a, b):
        idx = range(max(0, int(a)), min(n, int(b)))
        if not idx:
            return {"seconds": 0}
        return {
            "seconds": len(idx),
            "deferred_mean": round(sum(d[i] for i in idx) / len(idx), 2),
            "deferred_max": max(d[i] for i in idx),
            "paused_mean": round(sum(p[i] for i in idx) / len(idx), 2),
            "paused_max": max(p[i] for i in idx),
            "seconds_with_wait": sum(1 for i in idx if d[i] or p[i]),
        }

    out = {"before_load": span(0, on if on is not None else n)}
    if on is not None:
        out["during_load"] = span(on, off if off is not None else n)
    settled = None
    if off is not None and off < wall:
        out["after_load"] = span(off, n)
        busy = [i for i in range(int(off), n) if d[i] or p[i]]
        settled = round(max(0.0, busy[-1] + 1 - off), 1) if busy else 0.0
    out["settled_after_load_s"] = settled  # None: the run ended before the load stopped
    out["seconds_after_load"] = round(wall - off, 1) if off is not None else None
    return out


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def _mark(ok) -> str:
    return "[n/a ]" if ok is None else ("[MET ]" if ok else "[MISS]")


def digits(xs: list[int]) -> str:
    return "".join("." if x == 0 else (str(x) if x < 10 else "+") for x in xs)


def report_lines(results: list[dict], rows: int, pin: dict) -> list[str]:
    lines = [
        f"{'layout':<9} {'throttle':<8} {'TPS before':>10} {'during':>7} {'after':>7} {'avg ms b/d':>12} "
        f"{'p99 ms b/d':>13} {'TPS x':>6} {'avg x':>6} {'p99 x':>6} {'after p99 x':>11} {'backfill s':>10} "
        f"{'max deferred':>12} {'pauses':>7}",
    ]
    by = {(r["layout"], r["throttle"], r["kind"]): r for r in results}
    for r in results:
        if r["kind"] != "oltp":
            continue
        b, d, a = r["oltp"]["before"], r["oltp"]["during"], r["oltp"]["after"]
        lines.append(
            f"{r['layout']:<9} {r['throttle']:<8} {fmt(b.get('tps')):>10} {fmt(d.get('tps')):>7} {fmt(a.get('tps')):>7} "
            f"{fmt(b.get('avg_ms'), '.2f') + '/' + fmt(d.get('avg_ms'), '.2f'):>12} "
            f"{fmt(b.get('p99_ms'), '.1f') + '/' + fmt(d.get('p99_ms'), '.1f'):>13} "
            f"{fmt(ratio(d.get('tps'), b.get('tps')), '.2f'):>6} {fmt(ratio(d.get('avg_ms'), b.get('avg_ms')), '.2f'):>6} "
            f"{fmt(ratio(d.get('p99_ms'), b.get('p99_ms')), '.2f'):>6} {fmt(ratio(a.get('p99_ms'), b.get('p99_ms')), '.2f'):>11} "
            f"{r['backfill_seconds']:>10.1f} {r['max_deferred_at_once']:>12} {r['read_pauses']:>7}" + _run_note(r)
        )
    for layout in ("separate", "shared"):
        off, on = by.get((layout, "off", "oltp")), by.get((layout, "on", "oltp"))
        if off and on:
            lines.append(
                f"{layout}, pgbench running: the default spec's backfill took "
                f"{on['backfill_seconds'] / off['backfill_seconds']:.2f}x its unthrottled time"
            )
        off, on = by.get((layout, "off", "idle")), by.get((layout, "on", "idle"))
        if off and on:
            lines.append(
                f"{layout}, idle source (no pgbench): off {off['backfill_seconds']:.1f} s{_run_note(off)}, default spec "
                f"{on['backfill_seconds']:.1f} s{_run_note(on)} ({on['backfill_seconds'] / off['backfill_seconds']:.2f}x), "
                f"deferred at once (max) {on['max_deferred_at_once']}, read pauses {on['read_pauses']}"
            )
    mid = next((r for r in results if r["kind"] == "mid"), None)
    if mid:
        tl = mid["timeline"]
        on_s, off_s = tl["load"]
        lines.append(
            f"mid-backfill load ({mid['layout']}, default spec): expected {mid['expected_s']:.1f} s ({mid['expected_from']}); "
            f"pgbench from {fmt(on_s, '.1f')} s to {fmt(off_s, '.1f')} s after the run started; run {mid['run_state']} "
            f"in {mid['backfill_seconds']:.1f} s, {mid['rows_loaded']:,} rows"
        )
        for name in ("before_load", "during_load", "after_load"):
            s = mid.get(name)
            if s and s["seconds"]:
                lines.append(
                    f"  {name.replace('_', ' '):<12} {s['seconds']:>4} s: chunks deferred per second mean "
                    f"{s['deferred_mean']:.2f} (max {s['deferred_max']}), reads paused per second mean "
                    f"{s['paused_mean']:.2f} (max {s['paused_max']}); {s['seconds_with_wait']} s with a chunk waiting"
                )
        led = mid["ledger"]
        lines.append(
            f"  chunk logs: {mid['read_pauses']} read pause(s) in {mid['chunks_paused']} chunk(s), {mid['paused_s']} s "
            f"in all; ledger: {led.get('chunks_waited', '-')} of {led.get('chunks', '-')} chunks waited, "
            f"waited_load_s {led.get('waited_load_s', '-')} s in all; settled (no chunk deferred or paused) "
            f"{fmt(mid['settled_after_load_s'], '.1f')} s after the load stopped"
        )
        ticks = "".join("|" if i % 10 == 0 else " " for i in range(len(tl["running"])))
        load = "".join(
            "L" if on_s is not None and on_s <= i < (off_s if off_s is not None else 1e9) else "."
            for i in range(len(tl["running"]))
        )
        lines += [
            "  per second since the run started (| every 10 s; . = 0, + = 10 or more):",
            f"    {'':<9}{ticks}",
            f"    {'pgbench':<9}{load}",
            f"    {'running':<9}{digits(tl['running'])}",
            f"    {'deferred':<9}{digits(tl['deferred'])}",
            f"    {'paused':<9}{digits(tl['paused'])}",
            f"    {'retry':<9}{digits(tl.get('retry', []))}  (up_for_retry: a try failed, waiting retry_delay)",
        ]
        if mid.get("retried"):
            lines.append(f"  {mid['retried']} chunk(s) needed a second try (see the task logs / scheduler log)")
    lines += target_lines(by, mid, rows, pin)
    return lines


def _run_note(r: dict) -> str:
    return (
        "" if r["run_state"] == "success" and r["rows_loaded"] else f"  RUN {r['run_state']}, {r['rows_loaded']} rows"
    )


def target_lines(by: dict, mid: dict | None, rows: int, pin: dict) -> list[str]:
    size = "" if rows >= FULL_ROWS else f" (at {rows:,} rows, not the full size the targets are about)"
    lines = [f"targets (issue 23: pinned layout, default spec, full size){size}:"]
    if not pin.get("pinned"):
        lines.append(f"  note: the 'separate' layout ran UNPINNED ({pin.get('why_not', 'not pinned')})")
    on = by.get(("separate", "on", "oltp"))
    if on:
        b, d = on["oltp"]["before"], on["oltp"]["during"]
        p99 = ratio(d.get("p99_ms"), b.get("p99_ms"))
        tps = ratio(d.get("tps"), b.get("tps"))
        lines.append(
            f"  {_mark(None if p99 is None else p99 <= 1.2)} pgbench p99 during / before   {fmt(p99, '.2f'):>6}  target <= 1.2"
        )
        lines.append(
            f"  {_mark(None if tps is None else tps >= 0.85)} pgbench TPS during / before   {fmt(tps, '.2f'):>6}  target >= 0.85"
        )
    off, on = by.get(("separate", "off", "idle")), by.get(("separate", "on", "idle"))
    if off and on:
        x = ratio(on["backfill_seconds"], off["backfill_seconds"])
        ok = x is not None and x <= 1.25 and on["run_state"] == off["run_state"] == "success"
        lines.append(f"  {_mark(ok)} idle source: default / off time  {fmt(x, '.2f'):>6}  target <= 1.25")
    if mid:
        during = mid.get("during_load") or {}
        waited = bool(during.get("seconds_with_wait"))
        settled = mid["settled_after_load_s"]
        resumed = settled is not None and settled <= RESUME_S
        done = mid["run_state"] == "success"
        lines.append(
            f"  {_mark(waited and resumed and done)} mid-load: chunks wait or pause during the load "
            f"({'yes' if waited else 'no'}), none from {RESUME_S:.0f} s after it "
            f"({'n/a: the run ended during the load' if settled is None else ('yes' if resumed else 'no')}: "
            f"settled {fmt(settled, '.1f')} s), run completes ({mid['run_state']})"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.source_impact", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=FULL_ROWS, help="rows of the source table (default 1,500,000)")
    p.add_argument("--days", type=int, default=730, help="days its created_at spans (default 730)")
    p.add_argument("--scale", type=int, default=10, help="pgbench scale of the source's OLTP tables (default 10)")
    p.add_argument("--phase-seconds", type=float, default=20, help="length of the before and after phases")
    p.add_argument("--layouts", default="separate,shared", help="separate, shared or both")
    p.add_argument("--skip-idle", action="store_true", help="skip the idle-source runs (no pgbench, off vs on)")
    p.add_argument("--skip-mid-load", action="store_true", help="skip the mid-backfill load scenario")
    p.add_argument("--skip-oltp", action="store_true", help="skip the runs with pgbench before/during/after")
    p.add_argument(
        "--only-mid-load",
        action="store_true",
        help="separate layout: only the idle unthrottled run (the expected time) and the mid-backfill load run",
    )
    p.add_argument("--mid-load-from", type=float, default=0.25, help="start pgbench at this share of the expected time")
    p.add_argument("--mid-load-to", type=float, default=0.60, help="and stop it at this share")
    p.add_argument("--timeout", type=float, default=7200, help="give up on one backfill run after this many s")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep both clusters' data folders (stopped), the Airflow metadata database and AIRFLOW_HOME (task logs)",
    )
    args = p.parse_args(argv)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in ("separate", "shared")]
    if bad or not layouts:
        p.error(f"--layouts takes separate, shared or both (comma-separated), got {args.layouts!r}")
    if args.only_mid_load and (args.skip_idle or args.skip_mid_load):
        p.error("--only-mid-load needs the idle run and the mid-load run: drop --skip-idle/--skip-mid-load")
    if not 0 <= args.mid_load_from < args.mid_load_to:
        p.error("--mid-load-from must be >= 0 and below --mid-load-to")
    layouts.sort(key=("separate", "shared").index)
    from benchmarks.sandbox import BackfillSandbox

    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    pinning = cpuset.plan()
    log(f"pinning: {pinning.describe()}")
    results: list[dict] = []
    pins: dict[str, dict] = {}
    # the host cluster: the destination, Airflow's metadata database and the shared layout's source
    with (
        PrivateCluster(cpus=pinning.source, keep=args.keep) as src_pc,
        PrivateCluster(settings={"max_connections": "200"}, keep=args.keep) as host_pc,
        tempfile.TemporaryDirectory(prefix="bench_source_") as tmp,
    ):
        hosts = Hosts(pinning, src_pc, host_pc)
        dbs = Databases(host_pc.admin_url)
        shared_src, dst = dbs.create()
        srcs = {"separate": src_pc.create_database("bench_src"), "shared": shared_src}
        for layout in layouts:
            log(f"{layout}: seeding {args.rows:,} rows and pgbench scale {args.scale} on the source")
            scattered.seed(srcs[layout], args.rows, args.days)
            subprocess.run(
                [pg_bin("pgbench"), "-i", "-q", "-s", str(args.scale), srcs[layout]],
                check=True,
                capture_output=True,
                timeout=1800,
            )
        sb = BackfillSandbox(host_pc.admin_url, shared_src, dst, specs(), log=log, keep=args.keep)
        sb.env.update({f"AIRFLOW_CONN_BENCH_SRC_{k.upper()}": v for k, v in srcs.items()})
        with sb:
            sb.start_services()
            # a freshly started Airflow 3 spends ~8-10 s on its very first task instance, once per start: one
            # untimed run over an empty day first (as benchmarks.run's (9) does), so the first timed run is not
            # charged for it
            # its plan checks the destination table, created per scenario: create it for the warm-up too
            scattered.fresh_destination(dst)
            warm_dag = f"backfill_src_{layouts[0]}_off"  # a layout whose source was seeded in this run
            w = sb.start_run(warm_dag, {"start": "2031-01-01", "end": "2031-01-02"})
            warm = sb.wait_run(warm_dag, w)
            log(f"warm-up run over an empty day (not timed): {warm['state']} in {warm['run_seconds']:.1f} s")
            if warm["state"] != "success":
                log(f"warm-up task instances: {json.dumps(warm['tasks'])}")
            for layout in layouts:
                pins[layout] = hosts.apply(layout, sb)
                log(f"{layout}: cores in use {json.dumps(pins[layout])}")
                for kind in ("oltp", "idle"):
                    if (kind == "idle" and args.skip_idle) or (
                        kind == "oltp" and (args.only_mid_load or args.skip_oltp)
                    ):
                        continue
                    for mode in ("off", "on"):
                        if args.only_mid_load and mode == "on":  # the idle "off" run gives the expected time
                            continue
                        log(f"{layout}, throttle {mode}, {kind}")
                        r = run_scenario(sb, args, hosts, layout, mode, srcs[layout], dst, Path(tmp), kind)
                        r["cores"] = pins[layout]
                        results.append(r)
                if layout == "separate" and not args.skip_mid_load:
                    base = next(
                        (
                            r
                            for k in ("idle", "oltp")
                            for r in results
                            if (r["layout"], r["throttle"], r["kind"]) == (layout, "off", k)
                        ),
                        None,
                    )
                    expected = base["backfill_seconds"] if base else 60.0
                    src_of = f"the unthrottled {base['kind']} run's time" if base else "no off run: 60 s assumed"
                    log(f"{layout}, default spec, pgbench mid-backfill: expected {expected:.1f} s ({src_of})")
                    r = run_scenario(
                        sb,
                        args,
                        hosts,
                        layout,
                        "on",
                        srcs[layout],
                        dst,
                        Path(tmp),
                        "mid",
                        load_from=args.mid_load_from * expected,
                        load_to=args.mid_load_to * expected,
                    )
                    r.update(expected_s=expected, expected_from=src_of, cores=pins[layout])
                    results.append(r)
        if args.keep:
            log(
                f"kept (stopped): source cluster {src_pc.dir} (port {src_pc.port}), host cluster {host_pc.dir} "
                f"(port {host_pc.port}: destination, Airflow metadata); start one with "
                f"`runuser -u postgres -- {pg_bin('pg_ctl')} -D DIR start`"
            )
        else:
            dbs.drop()
    load_end = [round(x, 2) for x in os.getloadavg()]
    print()
    print(
        f"source impact: {args.rows:,} rows over {args.days} days (default chunking), pgbench -c 4 -j 2 scale "
        f"{args.scale}; throttle off = {json.dumps(OFF)}, on = the default spec; load {load_start} -> {load_end}"
    )
    print(f"pinning: {pinning.describe()}")
    for layout, pin in pins.items():
        print(
            f"  {layout}: "
            + (
                f"source cluster {pin['source_cluster']}, pgbench {pin['pgbench']}, host cluster {pin['host_cluster']}, "
                f"Airflow {pin['airflow']}, bench {pin['bench']}"
                if "source_cluster" in pin
                else f"unpinned ({pin['why_not']})"
            )
        )
    seen = sorted({c for r in results if r["layout"] == "separate" for c in r.get("airflow_cores_seen", [])})
    if seen:
        print(f"  separate: Airflow processes seen during its backfills (task processes included) on cores {seen}")
    print("\n".join(report_lines(results, args.rows, pins.get("separate", {}))))
    print(f"total {time.perf_counter() - t0:.0f}s")
    path = args.json or Path(__file__).parent / "results" / f"bench-source-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"args": vars(args), "pinning": pinning.__dict__, "cores": pins, "results": results}, indent=2, default=str
        )
    )
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
