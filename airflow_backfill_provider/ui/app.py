"""The progress page: a small FastAPI app mounted in Airflow 3's API server by the provider's plugin.

Read-only, and behind Airflow's own auth: every route depends on Airflow's auth dependencies
(``airflow.api_fastapi.core_api.security``), because a plugin's FastAPI app is not protected by Airflow
automatically. A request without a valid token (bearer header or the UI's ``_token`` cookie) gets 401/403;
the DAG routes also need read access to the DAG's task instances.

Each page load is one metadata query for the chunk task states, one for the run (and its plan XCom), and
one destination query each for the ledger and the validation summary; the HTML is rendered server-side
(one cell per calendar day, at most ``TABLE_ROWS`` chunk rows), so 20k chunks stay one small page.
The JSON route returns every chunk in compact columns.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse

if TYPE_CHECKING:
    from airflow_backfill_provider.observe.progress import DayCell

TABLE_ROWS = 200
#: close to Airflow's task-state colours (failed red, deferred mediumpurple, scheduled grey, success green);
#: "skipped" here means done by an earlier run: a paler green, not Airflow's hotpink "skipped"
COLORS = {
    "failed": "#e53e3e", "running": "#4299e1", "deferred": "#9370db", "pending": "#cbd5e0",
    "loaded": "#008000", "skipped": "#9ae6b4",
}  # fmt: skip


def create_app() -> FastAPI:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import get_user, requires_access_dag

    app = FastAPI(title="Backfill progress", docs_url=None, redoc_url=None, openapi_url=None)
    can_read_dag = [Depends(requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE))]
    the_user = Depends(get_user)  # Airflow's user dependency: 401/403 without a valid token

    @app.get("/", response_class=HTMLResponse)
    def index(user=the_user) -> str:
        from airflow_backfill_provider.observe.airflow_state import backfill_dag_ids

        items = "".join(
            f'<li><a href="dags/{quote(d)}">{html.escape(d)}</a></li>'
            for d in readable_dag_ids(user, backfill_dag_ids())
        )
        return _page("Backfill progress", f"<h1>Backfill progress</h1><ul>{items or '<li>no backfill DAGs</li>'}</ul>")

    @app.get("/dags/{dag_id}", response_class=HTMLResponse, dependencies=can_read_dag)
    def dag_page(dag_id: str, run_id: str | None = None, backfill_id: str | None = None) -> str:
        from airflow_backfill_provider.observe.airflow_state import in_logical_order, runs

        progress = _collect(dag_id, run_id, backfill_id)
        listed = in_logical_order(runs(dag_id, limit=20))[::-1]  # newest logical date first, not start order
        return _page(f"Backfill progress: {dag_id}", render(progress, listed), refresh=10)

    @app.get("/api/dags/{dag_id}", dependencies=can_read_dag)
    def dag_json(dag_id: str, run_id: str | None = None, backfill_id: str | None = None) -> JSONResponse:
        return JSONResponse(_collect(dag_id, run_id, backfill_id).to_dict())

    return app


def readable_dag_ids(user, dag_ids: list[str]) -> list[str]:
    """The DAGs whose progress page the user may open: Airflow's auth manager asked exactly what the DAG page's
    own dependency asks (``is_authorized_dag`` GET on the DAG's task instances, with the DAG's team), so the
    index lists no DAG the user may not read and links no page that would answer 403."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    if not dag_ids:
        return []
    auth_manager = get_auth_manager()
    mapping = getattr(DagModel, "get_dag_id_to_team_name_mapping", None)  # 3.3: one query (multi-team setups)
    teams = mapping(list(dag_ids)) if mapping is not None else {}
    return [
        d
        for d in dag_ids
        if auth_manager.is_authorized_dag(
            method="GET",
            access_entity=DagAccessEntity.TASK_INSTANCE,
            details=DagDetails(id=d, team_name=teams.get(d)),
            user=user,
        )
    ]


def _collect(dag_id: str, run_id: str | None, backfill_id: str | None = None):
    """``backfill_id``: that backfill's whole view ("latest": the newest); with neither it nor a run: the whole
    backfill when the latest run belongs to one, else the latest run."""
    from airflow_backfill_provider.observe.airflow_state import collect_view
    from airflow_backfill_provider.core.exceptions import BackfillError

    try:
        if backfill_id:
            return collect_view(dag_id, run_id or None, whole=True,
                                backfill_id=None if backfill_id == "latest" else backfill_id)  # fmt: skip
        return collect_view(dag_id, run_id or None, whole=False if run_id else None)
    except BackfillError as err:
        raise HTTPException(status_code=404, detail=str(err)) from err


# ------------------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:Inter,-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 margin:0;padding:20px 24px;color:#1a202c;background:#fff;font-size:14px;line-height:1.45}
a{color:#017cee;text-decoration:none} a:hover{text-decoration:underline}
h1{font-size:20px;font-weight:600;margin:0 0 12px} h2{font-size:16px;font-weight:600;margin:22px 0 8px}
.card{border:1px solid #e2e8f0;border-radius:6px;padding:10px 14px;margin:10px 0;background:#f7fafc}
.totals span{display:inline-block;margin:2px 22px 2px 0} .big{font-size:18px;font-weight:600}
.legend{margin:8px 0} .legend span{display:inline-flex;align-items:center;gap:4px;margin-right:14px;font-size:13px}
.legend i{display:inline-block;width:14px;height:14px;border-radius:3px}
table.cal{border-collapse:separate;border-spacing:3px;table-layout:fixed}
table.cal th,table.cal td{padding:0;width:18px;min-width:18px;max-width:18px;height:18px;font-size:11px;
 font-weight:400;text-align:center;color:#718096}
table.cal th.m,table.cal td.m{width:64px;min-width:64px;max-width:64px;text-align:left;color:#1a202c}
table.cal td.c{border-radius:3px;cursor:default} table.cal td.e{background:#f7fafc}
td.v-fail{outline:2px solid #1a202c;outline-offset:-1px} td.v-warn{outline:2px dashed #dd6b20;outline-offset:-1px}
table.t{border-collapse:collapse;font-size:13px;margin:4px 0}
table.t td,table.t th{border-bottom:1px solid #e2e8f0;padding:4px 10px;text-align:right}
table.t th{background:#edf2f7;font-weight:600;color:#4a5568}
table.t td:first-child,table.t th:first-child{text-align:left}
table.t tr.current td{background:#ebf8ff;font-weight:600}
.runs{margin:6px 0} .runs a{display:inline-block;margin:2px 8px 2px 0;padding:1px 8px;border:1px solid #e2e8f0;
 border-radius:12px;font-size:12px} .runs a.current{background:#017cee;color:#fff;border-color:#017cee}
.earlier{color:#718096;font-style:italic} td.err{text-align:left;color:#c53030}
.s{display:inline-block;padding:0 6px;border-radius:8px;color:#fff;font-size:12px}
.problem{border-color:#c53030;background:#fff5f5;color:#c53030;font-weight:600} .problem p{margin:2px 0}
code.cmd{white-space:nowrap;background:#fff;border:1px solid #fed7d7;border-radius:3px;padding:0 4px}
"""


def _page(title: str, body: str, refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>{meta}<title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>"
    )


def _problem(message: str) -> str:
    """A problem's paragraph; the command after "Create it: " on one line (a wrapped "--include-deferred"
    reads as two arguments)."""
    head, sep, command = message.partition("Create it: ")
    if not sep:
        return f"<p>{html.escape(message)}</p>"
    return f"<p>{html.escape(head + sep)}<code class='cmd'>{html.escape(command)}</code></p>"


def _secs(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _num(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render(p, runs: list[dict]) -> str:
    """The page body for one run's :class:`~airflow_backfill_provider.observe.progress.Progress`."""
    from airflow_backfill_provider.observe.progress import STATES, format_eta

    e = html.escape
    run = p.run
    b = p.backfill
    out = [f"<h1>Backfill progress: {e(p.dag_id)}</h1>"]
    if runs:
        current = run.run_id if run and b is None else None
        links = "".join(
            f'<a href="?run_id={quote(r["run_id"])}"{" class=current" if r["run_id"] == current else ""}>'
            f"{e(r['run_id'])} ({e(r['state'])})</a>"
            for r in runs[:10]
        )
        whole = next((r for r in runs if r.get("backfill_id") or r.get("run_type") == "backfill"), None)
        if whole is not None and b is None:
            target = whole.get("backfill_id") or "latest"
            links += f'<a id="whole-backfill" href="?backfill_id={quote(str(target))}">whole backfill</a>'
        out.append(f'<div class="runs">Runs (logical date, newest first): {links}</div>')
    if p.problems:
        out.append('<div class="card problem" id="problems">' + "".join(map(_problem, p.problems)) + "</div>")
    if run is None:
        out.append("<p>No run yet.</p>")
        return "".join(out)
    rng = f"[{run.start.date()}, {run.end.date()})" if run.start and run.end else "range not planned yet"
    what = f"{e(b.label.capitalize())}</b>: {len(b.runs)} run(s)" if b is not None else f"Run <b>{e(run.run_id)}</b>"
    if b is not None:
        what = "<b>" + what
    out.append(f'<p id="run">{what} ({e(run.state or "")}), {e(rng)}, {e(run.granularity or "")}</p>')
    from airflow_backfill_provider.observe.progress import rate_summary, rows_summary

    out.append(
        '<div class="totals card">'
        f'<span class="big" id="done">{p.done}/{p.total} chunks done ({p.percent:.0f}%)</span>'
        f'<span id="rows">rows: {e(rows_summary(p))} ({p.rows_done:,} done in range)</span>'
        f'<span id="rate">rate {e(rate_summary(p))}</span>'
        f'<span class="big" id="eta">ETA {e(format_eta(p.eta_s, p.eta_note))}</span></div>'
    )
    out.append(
        '<div class="legend" id="counts">'
        + "".join(
            f'<span data-state="{s}"><i style="background:{COLORS[s]}"></i> {s} {p.counts[s]}</span>' for s in STATES
        )
        + '<span><i style="outline:2px solid #1a202c;outline-offset:-1px"></i> validation failed</span>'
        '<span><i style="outline:2px dashed #dd6b20;outline-offset:-1px"></i> validation warned</span>'
        '<span><i style="background:#f7fafc;border:1px solid #e2e8f0"></i> no chunk</span></div>'
    )
    w = p.waits
    waiting_now = (
        f"; {w['deferred_now']} chunk(s) waiting now (deferred, no worker slot held)" if w["deferred_now"] else ""
    )
    out.append(
        f'<p id="waits">Waits before reading the source: <span id="wait-load">{w["load_s"]:,.1f} s</span> for its load, '
        f'<span id="wait-pacing">{w["pacing_s"]:,.1f} s</span> for pacing turns ({w["chunks_waited"]} loaded '
        f"chunk(s) waited){waiting_now}</p>"
    )
    if b is not None:
        out.append(_backfill_runs(b))
    out.append(_failures(p))
    out.append("<h2>Calendar</h2>" + _calendar(p))
    out.append(_validation(p))
    out.append(_chunks_table(p))
    return "".join(out)


def _backfill_runs(b) -> str:
    """The backfill's runs in logical-date order, each with its chunks done and failed."""
    e = html.escape
    rows = "".join(
        f'<tr data-run="{e(r.run_id)}"><td>{e(r.logical_date.isoformat() if r.logical_date else "-")}</td>'
        f'<td><a href="?run_id={quote(r.run_id)}">{e(r.run_id)}</a></td><td>{e(r.state or "-")}</td>'
        f"<td>{r.done}/{r.total}</td><td>{r.failed}</td></tr>"
        for r in b.runs
    )
    return (
        f"<h2>Runs of this backfill ({len(b.runs)}), logical date order</h2><table class='t' id='backfill-runs'>"
        "<tr><th>logical date</th><th>run</th><th>state</th><th>chunks done</th><th>failed</th></tr>"
        + rows
        + "</table>"
    )


def _calendar(p) -> str:
    """One row per month, one fixed-width cell per day (header: day numbers 1-31, one per column); a cell shows the
    day's most telling chunk state."""
    e = html.escape
    months: dict[tuple[int, int], dict[int, DayCell]] = {}
    for cell in p.days:
        months.setdefault((cell.day.year, cell.day.month), {})[cell.day.day] = cell
    head = "<th class='m'></th>" + "".join(f"<th class='d'>{d}</th>" for d in range(1, 32))
    rows = [f"<table class='cal' id='calendar'><tr>{head}</tr>"]
    for (y, m), cells in sorted(months.items()):
        tds = []
        for d in range(1, 32):
            cell = cells.get(d)
            if cell is None:
                tds.append("<td class='e'></td>")
                continue
            v = f" v-{cell.validation}" if cell.validation else ""
            title = f"{cell.day} {cell.state}: {cell.chunks} chunk(s), {cell.rows:,} rows"
            title += f", validation {cell.validation}" if cell.validation else ""
            tds.append(
                f'<td class="c{v}" data-day="{cell.day}" data-state="{cell.state}" '
                f'data-validation="{cell.validation or ""}" style="background:{COLORS[cell.state]}" title="{e(title)}"></td>'
            )
        rows.append(f"<tr><td class='m'>{y}-{m:02d}</td>{''.join(tds)}</tr>")
    return "".join(rows) + "</table>"


def _validation(p) -> str:
    e = html.escape
    v = p.validation
    if not v and p.backfill is not None and p.worst_days:
        rows = "".join(
            f"<tr><td>{e(str(d.get('day')))}</td><td>{e(str(d.get('status')).upper())}</td>"
            f"<td>{e(_worst_metric(p, d))}</td></tr>"
            for d in p.worst_days[:50]
        )
        return ("<h2>Validation: days not passing in this backfill's runs</h2><table class='t' id='worst-days'>"
                "<tr><th>day</th><th>status</th><th>reason</th></tr>" + rows + "</table>")  # fmt: skip
    if not v and p.backfill is not None:  # the same words as `status --backfill`
        return '<h2>Validation</h2><p id="validation">No failing or warning day in this backfill\'s runs.</p>'
    if not v:
        return '<h2>Validation</h2><p id="validation">Not run yet for this run.</p>'
    head = (
        f'<p id="validation">Validation <b>{e(str(v["status"]).upper())}</b>: {v["days"]} day(s), '
        f"{v['days_warn']} warn, {v['days_fail']} fail; source {_num(v['source_rows'])} rows, destination "
        f"{_num(v['destination_rows'])} rows</p>"
    )
    if not p.worst_days:
        return "<h2>Validation</h2>" + head
    rows = "".join(
        f"<tr><td>{e(str(d.get('day')))}</td><td>{e(str(d.get('status')).upper())}</td>"
        f"<td>{_num(d.get('source_rows'))}</td><td>{_num(d.get('destination_rows'))}</td>"
        f"<td>{e(_worst_metric(p, d))}</td></tr>"
        for d in p.worst_days[:50]
    )
    return (
        "<h2>Validation: worst days first</h2>" + head + "<table class='t' id='worst-days'><tr><th>day</th>"
        "<th>status</th><th>source rows</th><th>destination rows</th><th>reason</th></tr>" + rows + "</table>"
    )


def _worst_metric(p, d: dict) -> str:
    if not d.get("diffs"):
        return "-"
    from airflow_backfill_provider.observe.progress import day_reason_of

    return day_reason_of(d, p.thresholds or (0.0, 0.0))


def _failures(p) -> str:
    """Why chunks failed: the first line of each error, identical ones grouped, most frequent first."""
    if not p.failures:
        return ""
    e = html.escape
    rows = "".join(
        f"<tr data-count='{n}'><td class='err'>{e(error)}</td><td>{n}</td>"
        f"<td>{e(', '.join(ids[:10]))}{' ...' if n > 10 else ''}</td></tr>"
        for error, n, ids in p.failures[:50]
    )
    return (
        f"<h2>Why {p.counts['failed']} chunk(s) failed</h2><table class='t' id='failures'><tr><th>error (first line)"
        "</th><th>chunks</th><th>which</th></tr>" + rows + "</table>"
    )


def _rows_cell(c) -> str:
    """This run's rows; a ledger row of an earlier run is shown as such, never as this run's figure."""
    if c.rows is not None:
        return _num(c.rows)
    if c.earlier_rows is not None:
        return (f'<span class="earlier" title="loaded by run {html.escape(c.earlier_run_id or "")}">'
                f"{_num(c.earlier_rows)} (earlier run)</span>")  # fmt: skip
    return "-"


def _chunks_table(p) -> str:
    """Failed, then running/deferred chunks, then the latest loaded ones: at most TABLE_ROWS rows."""
    e = html.escape
    order = {"failed": 0, "running": 1, "deferred": 2, "loaded": 3, "pending": 4, "skipped": 5}
    shown = sorted(p.chunks, key=lambda c: (order[c.state], -c.start.timestamp()))[:TABLE_ROWS]
    rows = "".join(
        f'<tr data-chunk="{e(c.chunk_id)}" data-state="{c.state}"><td>{e(c.chunk_id)}</td><td>{c.state}</td>'
        f"<td>{e(c.ti_state or '-')}</td><td class='rows'>{_rows_cell(c)}</td><td>{_num(c.written)}</td>"
        f"<td>{'-' if c.seconds is None else f'{c.seconds:.2f}'}</td><td class='rate'>{_num(c.rows_per_s)}</td>"
        f"<td>{_secs(c.waited_load_s)}</td><td>{_secs(c.waited_pacing_s)}</td><td>{c.tries}</td>"
        f"<td class='err'>{e(c.error or '')}</td></tr>"
        for c in shown
    )
    more = f"<p>{len(p.chunks) - len(shown)} more chunk(s) in the JSON API.</p>" if len(p.chunks) > len(shown) else ""
    return (
        "<h2>Chunks</h2><table class='t' id='chunks'><tr><th>chunk</th><th>state</th><th>task state</th>"
        "<th>rows read</th><th>written</th><th>seconds</th><th>rows/s</th><th>load wait s</th><th>pacing wait s</th>"
        "<th>tries</th><th>error (first line)</th></tr>" + rows + "</table>" + more
    )
