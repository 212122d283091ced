"""The watermark rule: the backfill clips to (or refuses) the live watermark and never writes it."""

import ast
import datetime as dt
import subprocess
import sys

import pytest

from tests.seed import create_orders, seed_orders
from airflow_backfill_provider.core.exceptions import WatermarkError
from airflow_backfill_provider.live import run_live_ingest
from airflow_backfill_provider.plan.planning import build_plan
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.transfer.chunk import transfer_chunk
from tests.conftest import REPO, fetch_all, table_digest
from tests import specs

PKG = REPO / "airflow_backfill_provider"
#: everything a backfill run executes (DAG file, factory, plan, chunks, Pattern B merge) and the shared
#: modules they use; none of these may reach the watermark writer
BACKFILL_MODULES = [  # full dotted names, so a move of a module rewrites them (scripts/relayout.py)
    "airflow_backfill_provider.factory",
    "airflow_backfill_provider.loader",
    "airflow_backfill_provider.plan.planning",
    "airflow_backfill_provider.transfer.chunk",
    "airflow_backfill_provider.prepare.source",
    "airflow_backfill_provider.transfer.pipe",
    "airflow_backfill_provider.transfer.upsert",
    "airflow_backfill_provider.prepare.swap",
    "airflow_backfill_provider.ledger.table",
    "airflow_backfill_provider.prepare.watermark",
    "airflow_backfill_provider.prepare.catalog",
    "airflow_backfill_provider.core.sql",
    "airflow_backfill_provider.core.chunks",
    "airflow_backfill_provider.operators.plan",
    "airflow_backfill_provider.operators.chunk",
    "airflow_backfill_provider.operators.merge",
]
WRITER_MODULES = {
    "airflow_backfill_provider.live",
    "airflow_backfill_provider.operators.live",
    "airflow_backfill_provider.live_factory",
}

WM_ROW = "SELECT t::text, xmin::text, ctid::text FROM backfill_watermarks t ORDER BY target_table"


def make_spec(src_url, dst_url, **extra):
    live = {"enabled": True, "lookback_s": 0, "start_from": "2024-01-04T12:00:00+00:00"}
    return specs.make_spec(src_url, dst_url, **{"live": live, **extra})


@pytest.fixture()
def seeded(src_url, dst_url, pg):
    """6 days of orders (2024-01-01..06); live ingest started at 2024-01-04 12:00 and has run once.

    Its watermark is then the newest version it loaded: ~2024-01-06 23:52 (updated_at = created_at here).
    """
    seed_orders(pg(src_url), rows=1200, days=6, start=dt.date(2024, 1, 1))
    pg(src_url).cursor().execute("UPDATE orders SET updated_at = created_at")
    create_orders(pg(dst_url))
    spec = make_spec(src_url, dst_url)
    run_live_ingest(spec)
    return src_url, dst_url, spec


def _imports(module: str) -> set[str]:
    """Package modules that ``module`` imports (statically, anywhere in the file, lazy imports included)."""
    path = PKG.joinpath(*module.split(".")).with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("airflow_backfill_provider"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import live`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("airflow_backfill_provider"))
    return {m for m in found if PKG.joinpath(*m.split(".")[1:]).with_suffix(".py").exists()}


def test_no_backfill_module_reaches_the_watermark_writer():
    seen, todo = set(), list(BACKFILL_MODULES)
    while todo:  # transitive closure over the package's own imports
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(_imports(mod.removeprefix("airflow_backfill_provider.")))
    assert not seen & WRITER_MODULES, f"a backfill module imports the watermark writer: {seen & WRITER_MODULES}"
    for mod in seen:
        text = PKG.joinpath(*mod.split(".")[1:]).with_suffix(".py").read_text()
        assert "advance_watermark" not in text, f"{mod} mentions the watermark writer"
    # the reader module holds no write statement at all
    reader = (PKG / "prepare/watermark.py").read_text().upper()
    assert not any(verb in reader for verb in ("INSERT ", "UPDATE ", "DELETE ", "TRUNCATE", "UPSERT"))
    # the backfill DAG file does not load live DAGs either
    assert "live" not in (REPO / "dags" / "backfill_dags.py").read_text()


@pytest.mark.heavy  # a fresh interpreter importing Airflow: seconds
def test_importing_the_backfill_path_does_not_load_the_writer():
    mods = ", ".join(BACKFILL_MODULES)
    code = f"import sys, {mods}; print(sorted(m for m in sys.modules if m in {sorted(WRITER_MODULES)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_plan_clips_its_end_to_the_watermark(seeded, pg):
    src, dst, spec = seeded
    wm = fetch_all(dst, "SELECT watermark FROM backfill_watermarks")[0][0]
    assert wm == fetch_all(src, "SELECT max(updated_at) FROM orders")[0][0]
    plan = build_plan(spec, "2024-01-01", "2024-01-10", dst_conn=pg(dst))
    assert plan.clipped and plan.end == wm and plan.chunks[-1].end == wm
    assert plan.watermark == wm
    assert any("clipped" in n for n in plan.notes)
    assert len(plan.chunks) == 6 and plan.chunks[-1].chunk_id.startswith("2024-01-06T00:00")  # last one partial
    # a range entirely at or after the watermark: nothing to do
    assert build_plan(spec, "2024-01-08", "2024-01-09", dst_conn=pg(dst)).chunks == []
    # a range before the watermark is left alone
    before = build_plan(spec, "2024-01-01", "2024-01-03", dst_conn=pg(dst))
    assert not before.clipped and len(before.chunks) == 2


def test_refuse_policy_fails_the_plan_and_names_the_watermark(seeded, pg):
    src, dst, spec = seeded
    refuse = load_spec({**spec.model_dump(), "watermark": {"policy": "refuse"}})
    with pytest.raises(WatermarkError, match=r"after the live watermark .* set watermark.policy: clip"):
        build_plan(refuse, "2024-01-01", "2024-01-10", dst_conn=pg(dst))
    assert len(build_plan(refuse, "2024-01-01", "2024-01-03", dst_conn=pg(dst)).chunks) == 2
    pg(dst).cursor().execute("DELETE FROM backfill_watermarks")  # live ingest never ran: nothing to refuse
    assert len(build_plan(refuse, "2024-01-01", "2024-01-10", dst_conn=pg(dst)).chunks) == 9


def test_watermark_is_byte_for_byte_unchanged_after_a_full_backfill_with_retries(seeded, pg):
    src, dst, spec = seeded
    before = fetch_all(dst, WM_ROW)
    assert len(before) == 1
    plan = build_plan(spec, "2024-01-01", "2024-01-10", dst_conn=pg(dst))
    assert plan.clipped and len(plan.chunks) == 6
    # one chunk fails mid-way (after its COPY, during the upsert), then is retried
    victim = plan.chunks[1]
    bad = fetch_all(
        src, "SELECT max(id) FROM orders WHERE created_at >= %s AND created_at < %s", (victim.start, victim.end)
    )[0][0]
    d = pg(dst).cursor()
    d.execute(
        f"""CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.id = {int(bad)} THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$;
            CREATE TRIGGER boom BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION boom();"""
    )
    for chunk in plan.chunks:
        if chunk is victim:
            with pytest.raises(Exception, match="injected failure"):
                transfer_chunk(spec, chunk)
        else:
            transfer_chunk(spec, chunk)
    d.execute("DROP TRIGGER boom ON orders")
    retry = build_plan(spec, "2024-01-01", "2024-01-10", dst_conn=pg(dst))
    assert [c.chunk_id for c in retry.chunks] == [victim.chunk_id]  # the ledger skips the done ones
    transfer_chunk(spec, victim)
    # and a full reprocess pass on top (as a cleared run would do)
    for chunk in build_plan(spec, "2024-01-01", "2024-01-10", reprocess=True, dst_conn=pg(dst)).chunks:
        transfer_chunk(spec, chunk)
    assert fetch_all(dst, WM_ROW) == before
    # backfill (created before the watermark) + live ingest (changed after 01-04 12:00) = the whole source
    assert table_digest(src) == table_digest(dst)


def test_watermark_unchanged_through_real_airflow_runs_with_a_failed_and_retried_chunk(
    seeded, pg, airflow_db, monkeypatch
):
    """The example DAG backfill_orders (dags/configs/orders.yaml) under dag.test(): fail a chunk, run again."""
    src, dst, _ = seeded
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_SOURCE_PG", src)
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_DEST_PG", dst)
    from airflow_backfill_provider.loader import load_backfill_dags

    dag = load_backfill_dags(REPO / "dags" / "configs", strict=True).dags["backfill_orders"]
    before = fetch_all(dst, WM_ROW)
    d = pg(dst).cursor()
    d.execute(
        """CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.created_at >= '2024-01-02' AND NEW.created_at < '2024-01-03' THEN
             RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$;
           CREATE TRIGGER boom BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION boom();"""
    )
    conf = {"start": "2024-01-01", "end": "2024-01-10"}
    first = dag.test(run_conf=conf)
    assert str(getattr(first.state, "value", first.state)) == "failed"
    assert fetch_all(dst, "SELECT count(*) FROM backfill_ledger") == [(5,)]  # 6 chunks up to the watermark, 1 failed
    d.execute("DROP TRIGGER boom ON orders")
    second = dag.test(run_conf=conf)
    assert str(getattr(second.state, "value", second.state)) == "success"
    assert fetch_all(dst, "SELECT count(*) FROM backfill_ledger") == [(6,)]
    assert table_digest(src) == table_digest(dst)
    assert fetch_all(dst, WM_ROW) == before
