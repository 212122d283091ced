"""The baselines our chunk path is compared with, each over the same chunks.

(2) ``physical_copy``: a bare streaming binary COPY pipe into an empty table: the physical limit.
(3) ``reference_upsert``: hand-written COPY -> temp staging -> newer-wins upsert, one transaction per chunk.
(4) ``naive_loop``: fetchall() then ``execute_values`` in batches of 1000.
(5) ``generic_transfer``: Airflow's own ``GenericTransfer`` (source ``get_records``, destination
    ``PostgresHook.insert_rows``), through ``AIRFLOW_CONN_*`` connections.

Every function opens its connections per chunk, as a task instance would, and times only the chunk loop.
Chunks are the small descriptors ``{"chunk_id", "start", "end"}`` (ISO timestamps), as in a mapped task.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import threading
import time

import psycopg2
import psycopg2.extras
from psycopg2 import sql

from benchmarks.seed import COLUMNS, KEY, TIME_COLUMN, VERSION_COLUMN

_PIPE_BYTES = 1 << 20  # a 1 MiB pipe and read size: fewer wake-ups than Linux's 64 KiB default
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _bounds(chunk: dict) -> tuple[dt.datetime, dt.datetime]:
    return dt.datetime.fromisoformat(chunk["start"]), dt.datetime.fromisoformat(chunk["end"])


def _cols() -> sql.Composed:
    return sql.SQL(", ").join(map(sql.Identifier, COLUMNS))


def select_chunk(table: str, chunk: dict) -> sql.Composed:
    start, end = _bounds(chunk)
    return sql.SQL("SELECT {cols} FROM {t} WHERE {tc} >= {a} AND {tc} < {b}").format(
        cols=_cols(), t=sql.Identifier(table), tc=sql.Identifier(TIME_COLUMN), a=sql.Literal(start), b=sql.Literal(end)
    )


def copy_pipe(src_cur, dst_cur, copy_out: sql.Composable, copy_in: sql.Composable) -> int:
    """Stream ``COPY ... TO STDOUT`` into ``COPY ... FROM STDIN`` through an OS pipe; return rows loaded.

    A writer thread drains the source while this thread feeds the destination (psycopg2 releases the GIL
    inside libpq), so memory stays at the pipe's size whatever the chunk's size.
    """
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:  # capped by /proc/sys/fs/pipe-max-size; the default still works
        pass
    failure: list[BaseException] = []

    def writer():
        try:
            with os.fdopen(w, "wb", buffering=1 << 16) as out:
                src_cur.copy_expert(copy_out, out)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(err)

    thread = threading.Thread(target=writer, name="copy-out", daemon=True)
    thread.start()
    try:
        with os.fdopen(r, "rb", buffering=0) as inp:  # closing it unblocks a writer if the load fails
            dst_cur.copy_expert(copy_in, inp, size=_PIPE_BYTES)
    finally:
        thread.join()
    if failure:
        raise failure[0]
    return dst_cur.rowcount


def _copy_sql(table: str, chunk: dict, into: str) -> tuple[sql.Composed, sql.Composed]:
    out = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(select_chunk(table, chunk))
    inp = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(sql.Identifier(into), _cols())
    return out, inp


def _timed(chunks: list[dict], one_chunk) -> dict:
    rows = 0
    per_chunk = []
    t0 = time.perf_counter()
    for chunk in chunks:
        c0 = time.perf_counter()
        n = one_chunk(chunk)
        per_chunk.append({"chunk_id": chunk["chunk_id"], "rows": n, "seconds": round(time.perf_counter() - c0, 4)})
        rows += n
    return {"rows": rows, "seconds": time.perf_counter() - t0, "chunks": len(chunks), "per_chunk": per_chunk}


def physical_copy(
    src_url: str, dst_url: str, chunks: list[dict], src_table: str = "orders", dst_table: str = "orders"
) -> dict:
    """(2) The physical limit: binary COPY source -> destination table, nothing else."""

    def one(chunk):
        src, dst = psycopg2.connect(src_url), psycopg2.connect(dst_url)
        try:
            out, inp = _copy_sql(src_table, chunk, dst_table)
            with src.cursor() as sc, dst.cursor() as dc:
                n = copy_pipe(sc, dc, out, inp)
            dst.commit()
            src.rollback()
            return n
        finally:
            src.close()
            dst.close()

    return _timed(chunks, one)


def upsert_sql(dst_table: str, stage: str, *, whole_row: bool = False) -> sql.Composed:
    """Newer wins; an equal version rewrites only a row that differs, so a rerun writes nothing.

    The equal-version test compares the non-key columns as a row constructor. ``whole_row`` compares
    ``(t.*)`` with ``(EXCLUDED.*)`` instead: same result, but it builds two composite values per row and
    costs about a quarter more backend CPU on a rerun (see README), so the reference does not use it.
    """
    non_key = [c for c in COLUMNS if c != KEY]
    if whole_row:
        differs = sql.SQL("(t.*) IS DISTINCT FROM (EXCLUDED.*)")
    else:
        differs = sql.SQL("({}) IS DISTINCT FROM ({})").format(
            sql.SQL(", ").join(sql.Identifier("t", c) for c in non_key),
            sql.SQL(", ").join(sql.Identifier("excluded", c) for c in non_key),
        )
    return sql.SQL(
        "INSERT INTO {dst} AS t ({cols}) SELECT {cols} FROM {stage} "
        "ON CONFLICT ({key}) DO UPDATE SET {sets} "
        "WHERE EXCLUDED.{ver} > t.{ver} OR (EXCLUDED.{ver} = t.{ver} AND {differs})"
    ).format(
        dst=sql.Identifier(dst_table),
        cols=_cols(),
        stage=sql.Identifier(stage),
        key=sql.Identifier(KEY),
        sets=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in non_key),
        ver=sql.Identifier(VERSION_COLUMN),
        differs=differs,
    )


def reference_upsert(
    src_url: str, dst_url: str, chunks: list[dict], src_table: str = "orders", dst_table: str = "orders"
) -> dict:
    """(3) Hand-written: COPY -> temp staging -> newer-wins upsert, one destination transaction per chunk."""
    stage = "stage"
    upsert = upsert_sql(dst_table, stage)
    written = {"upserted": 0}

    def one(chunk):
        src, dst = psycopg2.connect(src_url), psycopg2.connect(dst_url)
        try:
            out, inp = _copy_sql(src_table, chunk, stage)
            with src.cursor() as sc, dst.cursor() as dc:
                dc.execute(
                    sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(
                        sql.Identifier(stage), sql.Identifier(dst_table)
                    )
                )
                n = copy_pipe(sc, dc, out, inp)
                dc.execute(upsert)
                written["upserted"] += dc.rowcount  # inserted + updated rows
            dst.commit()
            src.rollback()
            return n
        finally:
            src.close()
            dst.close()

    result = _timed(chunks, one)
    result["upserted"] = written["upserted"]
    return result


def naive_loop(
    src_url: str,
    dst_url: str,
    chunks: list[dict],
    src_table: str = "orders",
    dst_table: str = "orders",
    batch: int = 1000,
) -> dict:
    """(4) What a first script does: fetch every row of the chunk, then insert in batches of ``batch``."""
    insert = sql.SQL("INSERT INTO {} ({}) VALUES %s").format(sql.Identifier(dst_table), _cols())

    def one(chunk):
        src, dst = psycopg2.connect(src_url), psycopg2.connect(dst_url)
        try:
            with src.cursor() as sc, dst.cursor() as dc:
                sc.execute(select_chunk(src_table, chunk))
                rows = sc.fetchall()
                psycopg2.extras.execute_values(dc, insert.as_string(dc), rows, page_size=batch)
            dst.commit()
            src.rollback()
            return len(rows)
        finally:
            src.close()
            dst.close()

    return _timed(chunks, one)


def generic_transfer(
    src_conn_id: str, dst_conn_id: str, chunks: list[dict], src_table: str = "orders", dst_table: str = "orders"
) -> dict:
    """(5) Airflow's ``GenericTransfer`` per chunk: ``get_records`` then ``PostgresHook.insert_rows``.

    Connections come from ``AIRFLOW_CONN_<ID>`` environment variables set by the caller.
    """
    import logging

    from airflow.providers.common.sql.operators.generic_transfer import GenericTransfer

    logging.getLogger("airflow").setLevel(logging.WARNING)  # its per-1000-row INFO lines are not the work
    conn = psycopg2.connect(_dsn_of(src_conn_id))
    try:  # render the chunk's SQL text with a psycopg2 connection; GenericTransfer takes a string
        texts = {c["chunk_id"]: select_chunk(src_table, c).as_string(conn) for c in chunks}
    finally:
        conn.close()

    ops = [
        GenericTransfer(
            task_id=f"generic_transfer_{i}",
            sql=texts[chunk["chunk_id"]],
            destination_table=dst_table,
            source_conn_id=src_conn_id,
            destination_conn_id=dst_conn_id,
            insert_args={"target_fields": list(COLUMNS), "commit_every": 1000},
        )
        for i, chunk in enumerate(chunks)
    ]
    for op in ops:  # resolve connections and hooks (and Airflow's one-time provider discovery) off the clock
        op.source_hook, op.destination_hook  # noqa: B018
    t0 = time.perf_counter()
    for op in ops:
        op.execute(context={})
    seconds = time.perf_counter() - t0
    # insert_rows returns nothing to count with: count what landed, outside the timing
    conn = psycopg2.connect(_dsn_of(dst_conn_id))
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(dst_table)))
            rows = cur.fetchone()[0]
    finally:
        conn.close()
    return {"rows": rows, "seconds": seconds, "chunks": len(chunks)}


def _dsn_of(conn_id: str) -> str:
    return os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"]
