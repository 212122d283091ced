"""(1) Our chunk operator's transfer path, as the operator runs it, minus Airflow.

Per chunk, what ``BackfillChunkOperator`` does once Airflow has started the task: open the source session,
probe the source's load on it (``throttle.probe_load`` + ``decide``), open the destination session, then
``transfer.transfer_chunk`` on both, with DSNs in place of Airflow connection ids. The benchmark never waits on the probe's decision (it records it). Imports happen before
the clock starts.
"""

from __future__ import annotations

import time


def spec_dict(src_table: str = "orders", dst_table: str = "orders", granularity: str = "month") -> dict:
    """The backfill spec a user would write for the benchmark's ``orders`` table."""
    return {
        "name": "bench_orders",
        "source_conn_id": "bench_src",
        "destination_conn_id": "bench_dst",
        "source_table": src_table,
        "destination_table": dst_table,
        "time_column": "created_at",
        "key_columns": ["id"],
        "version_column": "updated_at",
        "granularity": granularity,
        "timezone": "UTC",
        # the benchmark has no live ingest: no watermark table to read
        "watermark": {"enabled": False},
    }


def as_planned(spec: dict, src_url: str, dst_url: str, descriptors: list[dict]) -> tuple[list[dict], dict]:
    """What the plan task hands the chunks: descriptors with the prepared run (facts.prepare_run: ledger
    ready, fingerprints, catalog facts, identity), made once as PlanBackfillOperator does. Also returns the
    hand-over's cost: its JSON size per descriptor and the time a chunk takes to decode it."""
    from airflow_backfill_provider.prepare import facts
    from airflow_backfill_provider.core.chunks import Chunk
    from airflow_backfill_provider.connections import close_all, open_destination, open_source
    from airflow_backfill_provider.core.spec import load_spec

    loaded = load_spec(spec)
    chunks = [Chunk.from_descriptor(d, loaded.timezone) for d in descriptors]
    src = open_source(loaded, "backfill:bench:plan", src_url)
    dst = open_destination(loaded, "backfill:bench:plan", dst_url)
    try:
        prepared = facts.prepare_run(loaded, src, dst, chunks, source_conn_id=src_url)
    finally:
        close_all(src, dst)
    out = prepared.attach(descriptors)
    carried = out[0][facts.DESCRIPTOR_KEY] if out else ""
    t0 = time.perf_counter()
    for _ in range(100):
        facts.PreparedRun.decode(carried)
    handover = {"bytes_per_descriptor": len(carried), "decode_ms": (time.perf_counter() - t0) * 10}
    return out, handover


def our_transfer(
    src_url: str,
    dst_url: str,
    chunks: list[dict],
    spec: dict | None = None,
    probe: bool = True,
) -> dict:
    from airflow_backfill_provider.core.chunks import Chunk
    from airflow_backfill_provider.connections import application_name, close_all, open_destination, open_source
    from airflow_backfill_provider.prepare.facts import PreparedRun
    from airflow_backfill_provider.core.spec import load_spec
    from airflow_backfill_provider.throttle.probe import decide, probe_load
    from airflow_backfill_provider.transfer.chunk import Sessions, transfer_chunk

    backfill = load_spec(spec or spec_dict())
    planned = [Chunk.from_descriptor(c) for c in chunks]
    totals = {"rows": 0, "inserted": 0, "updated": 0, "unchanged": 0}
    per_chunk = []
    decisions: dict[str, int] = {}
    probe_seconds = 0.0
    t0 = time.perf_counter()
    for chunk, descriptor in zip(planned, chunks):
        appname = application_name(backfill.effective_dag_id, chunk.chunk_id)
        src_conn = open_source(backfill, appname, src_url)
        src_conn.autocommit = True  # as the operator's source session (operators/chunk.py _open_source)
        if probe:  # as the operator does: probe on the session the transfer then uses
            p0 = time.perf_counter()
            decision = decide(probe_load(src_conn), backfill.throttle)
            probe_seconds += time.perf_counter() - p0
            decisions[decision] = decisions.get(decision, 0) + 1
        c0 = time.perf_counter()  # the chunk's own work: its destination session, then the transfer
        sessions = Sessions(src_conn, open_destination(backfill, appname, dst_url))
        try:
            # the prepared run the plan task made once for the run, when the descriptor carries it
            result = transfer_chunk(
                backfill,
                chunk,
                sessions=sessions,
                prepared=PreparedRun.of_descriptor(descriptor),
                source=src_url,
                destination=dst_url,
            )
        finally:
            close_all(sessions.source, sessions.destination)
        totals["rows"] += result.rows_extracted
        for key in ("inserted", "updated", "unchanged"):
            totals[key] += getattr(result, key)
        per_chunk.append(
            {"chunk_id": result.chunk_id, "rows": result.rows_extracted, "seconds": round(time.perf_counter() - c0, 5)}
        )
    seconds = time.perf_counter() - t0
    return {
        **totals,
        "seconds": seconds,
        "chunks": len(planned),
        "per_chunk": per_chunk,
        "probe_decisions": decisions,
        "probe_seconds": probe_seconds,
    }


def our_batch(src_url: str, dst_url: str, chunks: list[dict], spec: dict | None = None) -> dict:
    """Chunks as one batch runs them (operators/chunk.py): one pair of sessions kept across the chunks, the
    source in autocommit, the prepared run checked once per source range, the load probed once up front."""
    from airflow_backfill_provider.core.chunks import Chunk
    from airflow_backfill_provider.connections import application_name, close_all, open_destination, open_source
    from airflow_backfill_provider.prepare.facts import PreparedRun
    from airflow_backfill_provider.core.spec import load_spec
    from airflow_backfill_provider.throttle.probe import decide, probe_load
    from airflow_backfill_provider.transfer.chunk import Sessions, transfer_chunk

    backfill = load_spec(spec or spec_dict())
    appname = application_name(backfill.effective_dag_id, "batch")
    per_chunk = []
    t0 = time.perf_counter()
    src = open_source(backfill, appname, src_url)
    src.autocommit = True
    sessions = Sessions(src, open_destination(backfill, appname, dst_url), batch=True)
    prepared = PreparedRun.of_descriptor(chunks[0]) if chunks else None
    try:
        decide(probe_load(src), backfill.throttle)
        for descriptor in chunks:
            c0 = time.perf_counter()
            result = transfer_chunk(
                backfill,
                Chunk.from_descriptor(descriptor),
                sessions=sessions,
                prepared=prepared,
                source=src_url,
                destination=dst_url,
            )
            per_chunk.append(
                {
                    "chunk_id": result.chunk_id,
                    "rows": result.rows_extracted,
                    "seconds": round(time.perf_counter() - c0, 5),
                }
            )
    finally:
        close_all(sessions.source, sessions.destination)
    return {"seconds": time.perf_counter() - t0, "chunks": len(chunks), "per_chunk": per_chunk}


def idle(import_ours: bool = True) -> dict:
    """Nothing but the imports: the floor under every peak RSS figure."""
    if import_ours:
        import airflow_backfill_provider.transfer.chunk  # noqa: F401
    else:
        import benchmarks.baselines  # noqa: F401
    return {"rows": 0, "seconds": 0.0}
