"""Catalog facts read once per run by the plan task and re-used by every chunk after a fingerprint check.

A chunk's column plan (drift.py) is made from both catalogs: columns, unique keys, type facts, and the
kind of the time filter. Read on every chunk's two fresh sessions, that is four statements over cold
catalog caches (~18 ms of an empty chunk's ~45 ms). The plan task reads them once (``read``), and
every chunk gets them (the plan task's XCom ``catalog``, the chunk operator's ``catalog`` argument).
Before using them a chunk runs ONE statement per side (``verify``): a fingerprint of the relation its
spec names (its OID, every attribute's name, type, typmod, collation, nullability, and, on the
destination, every unique index's shape). Any difference, a table dropped and re-created under the same
name included, and the chunk re-reads the catalogs as before: carried facts can only skip work, never
change what a chunk does.

Only tables whose column types (and their base and element types) are all built in are carried: a
built-in type cannot change, while a domain, enum or composite can (``ALTER DOMAIN``, ``ALTER TYPE ...
ADD ATTRIBUTE``) without touching the table's own catalog rows. Swap mode is not carried either (its
parallel table is created by the first chunk).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from psycopg2 import sql as psql

from airflow_backfill_provider import casts, drift, ledger, schema, source, timebounds
from airflow_backfill_provider.chunks import Chunk
from airflow_backfill_provider.schema import Column, UniqueKey
from airflow_backfill_provider.spec import BackfillSpec, TableName

#: fingerprint of a relation: what the column plan and the unique-key check depend on (constant SQL; the
#: names are bound parameters). Read BEFORE the facts it vouches for: a change between the two makes the
#: chunk's fingerprint differ, so stale facts are never used.
FINGERPRINT_SQL = (
    "WITH t AS ("
    + schema.FIND_TABLE
    + """)
SELECT md5(concat_ws('|', t.oid,
         (SELECT string_agg(concat_ws(',', a.attnum, a.attname, a.atttypid, a.atttypmod, a.attcollation,
                                      a.attnotnull, a.attisdropped, a.attgenerated,
                                      a.atthasdef, a.attidentity), ';' ORDER BY a.attnum)
            FROM pg_attribute a WHERE a.attrelid = t.oid AND a.attnum > 0),
         CASE WHEN %(keys)s THEN
         (SELECT string_agg(concat_ws(',', i.indexrelid, i.indkey, i.indnkeyatts, i.indimmediate, i.indisvalid,
                                      i.indpred IS NULL, i.indexprs IS NULL,
                                      to_jsonb(i) ->> 'indnullsnotdistinct'), ';' ORDER BY i.indexrelid)
            FROM pg_index i WHERE i.indrelid = t.oid AND i.indisunique) END))
FROM t
"""
)


@dataclass
class Facts:
    """One source range's catalog facts: what :func:`plan_from` needs, and the fingerprints."""

    source_table: str
    target: str
    dest_cols: list[Column]
    dest_keys: list[UniqueKey]
    src_cols: list[Column]
    dest_types: dict[str, casts.TypeInfo]
    src_types: dict[str, casts.TypeInfo]
    time_kind: str
    source_print: str
    dest_print: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Facts:
        def infos(raw: dict) -> dict[str, casts.TypeInfo]:
            out = {}
            for name, t in raw.items():
                fn = t.get("send_fn")
                out[name] = casts.TypeInfo(**{**t, "send_fn": tuple(fn) if fn else None})
            return out

        return cls(
            source_table=d["source_table"],
            target=d["target"],
            dest_cols=[Column(**c) for c in d["dest_cols"]],
            dest_keys=[UniqueKey(**{**k, "columns": tuple(k["columns"])}) for k in d["dest_keys"]],
            src_cols=[Column(**c) for c in d["src_cols"]],
            dest_types=infos(d["dest_types"]),
            src_types=infos(d["src_types"]),
            time_kind=d["time_kind"],
            source_print=d["source_print"],
            dest_print=d["dest_print"],
        )

    @property
    def carriable(self) -> bool:
        """Every column type built in on both sides (module docstring)."""
        return all(_builtin(t) for t in (*self.dest_types.values(), *self.src_types.values()))


def _builtin(t: casts.TypeInfo) -> bool:
    return t.builtin and t.base_builtin and t.elem_builtin is not False


def fingerprint(conn, table: TableName, *, keys: bool) -> str | None:
    """The relation's fingerprint (None: no such relation on this session's search_path)."""
    with conn.cursor() as cur:
        cur.execute(FINGERPRINT_SQL, {"name": table.name, "schema": table.schema_, "keys": keys})
        row = cur.fetchone()
    return row[0] if row else None


# the destination's check in one round trip: the target's fingerprint and the ledger's state
_DEST_CHECK = "SELECT (" + FINGERPRINT_SQL + "), s.* FROM (" + ledger.STATE_SQL + ") AS s"


def verify(facts: Facts, src_conn, dst_conn, src_table: TableName, target: TableName, ledger_table: TableName):
    """One statement per side: (both fingerprints still match ``facts``, the ledger needs no DDL)."""
    with src_conn.cursor() as cur:
        cur.execute(FINGERPRINT_SQL, {"name": src_table.name, "schema": src_table.schema_, "keys": False})
        row = cur.fetchone()
        same = row is not None and row[0] == facts.source_print
    with dst_conn.cursor() as cur:
        params = {
            "name": target.name,
            "schema": target.schema_,
            "keys": True,
            "ledger": psql.Identifier(*ledger_table.parts).as_string(cur),
        }
        cur.execute(_DEST_CHECK, params)
        dest_print, *state = cur.fetchone()
    return same and dest_print == facts.dest_print, ledger.is_ready(state)


def prepare(spec: BackfillSpec, src_conn, dst_conn, chunk: Chunk) -> tuple[TableName, drift.ColumnPlan]:
    """Catalog checks before any write (tables, columns, unique key), then what to select: read now."""
    return plan_from(spec, read(spec, src_conn, dst_conn, chunk, prints=False), chunk)


def read(spec: BackfillSpec, src_conn, dst_conn, chunk: Chunk, *, prints: bool = True) -> Facts:
    """The catalog facts of the range ``chunk`` reads; ``prints``: with the fingerprints, to carry them."""
    target = spec.staging_target
    src_table, _ = source.source_for(spec, chunk)
    # first (FINGERPRINT_SQL): a change after them only makes a chunk re-read the catalogs
    dest_print = (fingerprint(dst_conn, target, keys=True) or "") if prints else ""
    source_print = (fingerprint(src_conn, src_table, keys=False) or "") if prints else ""
    dest_cols, dest_keys = schema.describe_table(dst_conn, target, side="destination")
    schema.check_destination(spec, dest_cols, dest_keys, target)  # before the source: its errors first
    src_cols, _ = schema.describe_table(src_conn, src_table, side="source")
    dest_types = schema.describe_types(dst_conn, target)
    src_types = schema.describe_types(src_conn, src_table)
    facts = Facts(
        source_table=str(src_table),
        target=str(target),
        dest_cols=dest_cols,
        dest_keys=dest_keys,
        src_cols=src_cols,
        dest_types=dest_types,
        src_types=src_types,
        time_kind="",
        source_print=source_print,
        dest_print=dest_print,
    )
    _, plan = plan_from(spec, facts, chunk, time_kind=None)
    # chunk bounds are literals of the filtered column's own type (timebounds.py); may ask the source
    facts.time_kind = timebounds.source_kind(src_conn, src_table, plan)
    return facts


def plan_from(
    spec: BackfillSpec, facts: Facts, chunk: Chunk, *, time_kind: str | None = ""
) -> tuple[TableName, drift.ColumnPlan]:
    """The chunk's column plan from facts (pure): the destination check, the drift decisions, the time kind."""
    target = spec.staging_target
    schema.check_destination(spec, facts.dest_cols, facts.dest_keys, target)
    src_table, expressions = source.source_for(spec, chunk)
    plan = drift.plan_columns(
        spec,
        facts.dest_cols,
        facts.src_cols,
        expressions=expressions,
        dest_types=facts.dest_types,
        src_types=facts.src_types,
    )
    if time_kind is not None:
        plan.time_kind = time_kind or facts.time_kind
        timebounds.check_granularity(plan.time_kind, spec.granularity, column=spec.time_column)
    return src_table, plan


def key(spec: BackfillSpec, chunk: Chunk) -> str:
    """Which entry of the carried facts a chunk uses: its source range (historical ranges differ)."""
    return str(source.source_range(spec, chunk))


def carry(spec: BackfillSpec, per_range: dict[str, Facts]) -> dict:
    """The plan task's XCom ``catalog``: the carriable facts per source range, tagged with the spec's shape
    (a chunk whose spec changed since the plan ignores them)."""
    if spec.mode == "swap":
        return {}
    entries = {k: f.to_json() for k, f in per_range.items() if f.carriable}
    return {"spec": spec_tag(spec), "ranges": entries} if entries else {}


def spec_tag(spec: BackfillSpec) -> str:
    """A digest of the spec: the carried facts were checked against this spec (keys, columns, casts)."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def usable(spec: BackfillSpec, chunk: Chunk, catalog: dict | None) -> Facts | None:
    """The carried facts for ``chunk``, if the plan carried any for this spec and source range."""
    if not isinstance(catalog, dict) or spec.mode == "swap" or catalog.get("spec") != spec_tag(spec):
        return None
    raw = (catalog.get("ranges") or {}).get(key(spec, chunk))
    if not isinstance(raw, dict):
        return None
    try:
        facts = Facts.from_json(raw)
    except (TypeError, KeyError, ValueError):  # written by another release: read the catalogs
        return None
    src_table, _ = source.source_for(spec, chunk)
    if facts.source_table != str(src_table) or facts.target != str(spec.staging_target) or not facts.carriable:
        return None
    return facts
