"""The prepared run: what the plan task works out once per run, and what every chunk re-uses after ONE
fingerprint statement per side.

    plan task   prepare_run: (swap mode) the parallel table made ready, then per source range
                the fingerprints of both tables, their catalog facts (columns, unique keys, type facts, the
                time filter's kind) and the backfill's identity -> PreparedRun, in every chunk descriptor
    chunk       ready: one statement on the source (its tables' fingerprints), one on the destination (the
                target's fingerprint, the live table's in swap mode, the ledger's state: the first chunk that
                finds no ledger creates it, so a plan writes no table but the parallel one); all equal -> the
                column plan from the carried facts, the carried identity; any difference -> prepared again
                from the catalogs, as a chunk run alone (no prepared run) always is

A fingerprint covers the relation the spec's name resolves to (its OID: a table dropped and re-created
under the same name differs), every attribute's name, type, typmod, collation, nullability, default,
identity and generation, and on the destination every unique index's shape. So the record never wins over
the ground truth: a re-created destination, a changed column or type (and so a changed cast) makes the
chunk prepare again. Column plans are only carried when every column type (and its base and element type)
is built in: a built-in type cannot change, while a domain, enum or composite can (``ALTER DOMAIN``, ``ALTER
TYPE ... ADD ATTRIBUTE``) without touching the table's own catalog rows; such a range still uses the carried
identity after the fingerprint check, and reads its column plan fresh.

The carried form is versioned (``v``) and tagged with the spec it was made for; a chunk whose spec changed
since the plan, or a record of another release, prepares from the catalogs.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field

from psycopg2 import sql as psql

from airflow_backfill_provider.core import timebounds
from airflow_backfill_provider.ledger import table as ledger
from airflow_backfill_provider.prepare import casts, catalog as schema, drift, identity, source, swap
from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.prepare.catalog import Column, UniqueKey
from airflow_backfill_provider.core.spec import BackfillSpec, TableName

log = logging.getLogger(__name__)

#: the carried form's version: a chunk ignores a prepared run of another version (and prepares itself)
VERSION = 1
#: the chunk descriptor's field that carries the prepared run (PreparedRun.encode)
DESCRIPTOR_KEY = "prep"
_ENCODING = "z1:"

#: fingerprint of a relation: what the column plan, the unique-key check and the identity depend on (a view's
#: definition included: a view redefined mid-run makes the chunk prepare again, under the new identity) (constant SQL; the
#: name is a bound parameter, resolved by the search_path as the catalog reads resolve it; a name that
#: resolves to no table, view or foreign table has none, so a chunk never matches it). Read BEFORE the facts
#: it vouches for: a change between the two makes the chunk's fingerprint differ, so stale facts are never
#: used. Lean on purpose: it is the first statement of a fresh backend, whose catalog caches are cold.
_FINGERPRINT = """
SELECT CASE WHEN c.relkind IN ('r', 'p', 'v', 'm', 'f') THEN md5(concat_ws('|', c.oid,
         (SELECT string_agg(concat_ws(',', a.attnum, a.attname, a.atttypid, a.atttypmod, a.attcollation,
                                      a.attnotnull, a.attisdropped, a.attgenerated,
                                      a.atthasdef, a.attidentity), ';' ORDER BY a.attnum)
            FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0),
         CASE WHEN %(keys)s THEN
         (SELECT string_agg(concat_ws(',', i.indexrelid, i.indkey, i.indnkeyatts, i.indimmediate, i.indisvalid,
                                      i.indpred IS NULL, i.indexprs IS NULL, {nulls_not_distinct}), ';'
                            ORDER BY i.indexrelid)
            FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique) END,
         CASE WHEN c.relkind IN ('v', 'm') THEN md5(pg_get_viewdef(c.oid)) END)) END
FROM pg_class c WHERE c.oid = to_regclass(%(rel)s)
"""


def _fingerprint_sql(conn, prefix: str = "") -> str:
    """The fingerprint statement for ``conn``'s server, its parameters prefixed (``%(p_rel)s``...) to
    fingerprint several relations in one statement."""
    # pg_index.indnullsnotdistinct exists from PostgreSQL 15 on
    nnd = "i.indnullsnotdistinct" if conn.server_version >= 150000 else "false"
    return _FINGERPRINT.replace("{nulls_not_distinct}", nnd).replace("%(", f"%({prefix}")


def _fingerprint_params(conn, table: TableName, *, keys: bool, prefix: str = "") -> dict:
    return {f"{prefix}rel": psql.Identifier(*table.parts).as_string(conn), f"{prefix}keys": keys}


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
        """Compact: rows of field values, not dicts (the prepared run travels in every chunk descriptor)."""
        return {
            "source_table": self.source_table,
            "target": self.target,
            "dest_cols": [dataclasses.astuple(c) for c in self.dest_cols],
            "dest_keys": [dataclasses.astuple(k) for k in self.dest_keys],
            "src_cols": [dataclasses.astuple(c) for c in self.src_cols],
            "dest_types": {n: dataclasses.astuple(t) for n, t in self.dest_types.items()},
            "src_types": {n: dataclasses.astuple(t) for n, t in self.src_types.items()},
            "time_kind": self.time_kind,
            "source_print": self.source_print,
            "dest_print": self.dest_print,
        }

    @classmethod
    def from_json(cls, d: dict) -> Facts:
        def info(row: list) -> casts.TypeInfo:
            named = dict(zip(_TYPE_FIELDS, row))
            fn = named["send_fn"]  # (schema, name): a list in JSON
            return casts.TypeInfo(**{**named, "send_fn": (fn[0], fn[1]) if fn else None})

        return cls(
            source_table=d["source_table"],
            target=d["target"],
            dest_cols=[Column(*c) for c in d["dest_cols"]],
            dest_keys=[UniqueKey(k[0], k[1], tuple(k[2]), *k[3:]) for k in d["dest_keys"]],
            src_cols=[Column(*c) for c in d["src_cols"]],
            dest_types={n: info(t) for n, t in d["dest_types"].items()},
            src_types={n: info(t) for n, t in d["src_types"].items()},
            time_kind=d["time_kind"],
            source_print=d["source_print"],
            dest_print=d["dest_print"],
        )

    @property
    def carriable(self) -> bool:
        """Every column type built in on both sides (module docstring)."""
        return all(_builtin(t) for t in (*self.dest_types.values(), *self.src_types.values()))


_TYPE_FIELDS = [f.name for f in dataclasses.fields(casts.TypeInfo)]


def _builtin(t: casts.TypeInfo) -> bool:
    return t.builtin and t.base_builtin and t.elem_builtin is not False


def fingerprint(conn, table: TableName, *, keys: bool) -> str | None:
    """The relation's fingerprint (None: no such table on this session's search_path)."""
    with conn.cursor() as cur:
        cur.execute(_fingerprint_sql(conn), _fingerprint_params(conn, table, keys=keys))
        row = cur.fetchone()
    return row[0] if row else None


def read(spec: BackfillSpec, src_conn, dst_conn, chunk: Chunk, *, prints: bool = True) -> Facts:
    """The catalog facts of the range ``chunk`` reads; ``prints``: with the fingerprints, to carry them."""
    target = spec.staging_target
    src_table, _ = source.source_for(spec, chunk)
    # first (_FINGERPRINT): a change after them only makes a chunk prepare again
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
    # chunk bounds are literals of the filtered column's own type (core/timebounds.py); may ask the source
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
    """Which entry of the prepared run a chunk uses: its source range (historical ranges differ)."""
    return str(source.source_range(spec, chunk))


def spec_tag(spec: BackfillSpec) -> str:
    """A digest of the spec: the prepared run was made for this spec (keys, columns, casts, selection)."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the prepared run -----------------------------------------------------------------------------


@dataclass
class Ready:
    """What one chunk runs with: the source relation its range reads, its column plan, the identity."""

    src_table: TableName
    plan: drift.ColumnPlan
    backfill: identity.BackfillIdentity


@dataclass
class PreparedRun:
    """Made once by the plan task (:func:`prepare_run`); checked by each chunk (:func:`ready`)."""

    spec: str  # spec_tag of the spec it was made for
    backfill: identity.BackfillIdentity
    ranges: dict[str, Facts]  # per source range (key)
    live_print: str = ""  # swap mode: the live table's fingerprint (the identity describes it)
    #: column plans already made from ``ranges`` in this process (a batch's chunks share them); not carried
    plans: dict[str, tuple[TableName, drift.ColumnPlan]] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        return {
            "v": VERSION,
            "spec": self.spec,
            "target": self.backfill.target,
            "description": self.backfill.description,
            "ranges": {k: f.to_json() for k, f in self.ranges.items()},
            "live": self.live_print,
        }

    @classmethod
    def from_json(cls, d) -> PreparedRun | None:
        """None for anything this release did not write (another version, a damaged record): prepare then."""
        if not isinstance(d, dict) or d.get("v") != VERSION:
            return None
        try:
            backfill = identity.from_description(d["target"], d["description"])
            ranges = {str(k): Facts.from_json(f) for k, f in d["ranges"].items()}
            return cls(str(d["spec"]), backfill, ranges, str(d.get("live") or ""))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def encode(self) -> str:
        """One opaque string (zlib, base64): the chunk's ``chunk`` argument is templated, and Airflow renders
        every string of it as a Jinja template (hundreds in the dict form, ~40 ms a task instance); this one
        has no template syntax and is small in XCom."""
        raw = json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()
        return _ENCODING + base64.b64encode(zlib.compress(raw, 6)).decode("ascii")

    @classmethod
    def decode(cls, text) -> PreparedRun | None:
        if not isinstance(text, str) or not text.startswith(_ENCODING):
            return None
        try:
            raw = zlib.decompress(base64.b64decode(text[len(_ENCODING) :], validate=True))
            return cls.from_json(json.loads(raw))
        except (ValueError, zlib.error):
            return None

    @classmethod
    def of_descriptor(cls, descriptor) -> PreparedRun | None:
        return cls.decode(descriptor.get(DESCRIPTOR_KEY)) if isinstance(descriptor, dict) else None

    def attach(self, descriptors: list[dict]) -> list[dict]:
        """The chunk descriptors (single chunks and batches) with this prepared run."""
        carried = self.encode()
        return [{**d, DESCRIPTOR_KEY: carried} for d in descriptors]

    def sources(self) -> dict[str, str]:
        """Every source relation the run reads, with its fingerprint."""
        return {f.source_table: f.source_print for f in self.ranges.values()}


def prepare_run(spec: BackfillSpec, src_conn, dst_conn, chunks: list[Chunk], *, source_conn_id: str | None = None):
    """The plan task's work for its chunks, once: the parallel table made ready (swap mode; the ledger is made
    by the first chunk that needs it: a plan writes nothing else), then per source range the fingerprints and
    catalog facts, then the identity (after the fingerprints: a change in between makes the chunks prepare
    again). Raises what a chunk would (PermanentChunkError)."""
    swap.ensure_parallel_table(dst_conn, spec)  # no-op in upsert mode
    live_print = (fingerprint(dst_conn, spec.destination, keys=False) or "") if spec.mode == "swap" else ""
    ranges = {key(spec, c): read(spec, src_conn, dst_conn, c) for c in source.one_per_source(spec, chunks)}
    backfill = identity.of(spec, src_conn, dst_conn, source_conn_id=source_conn_id)
    dst_conn.rollback()  # end the catalog reads' transaction
    return PreparedRun(spec_tag(spec), backfill, ranges, live_print)


def _check(spec: BackfillSpec, prepared: PreparedRun, facts: Facts, src_conn, dst_conn) -> tuple[bool, bool]:
    """ONE statement per side: (every fingerprint still matches, the ledger needs no DDL)."""
    tables = sorted(prepared.sources().items())
    parts, params = [], {}
    for i, (name, _) in enumerate(tables):
        parts.append("(" + _fingerprint_sql(src_conn, f"s{i}_") + ")")
        params.update(_fingerprint_params(src_conn, TableName.parse(name), keys=False, prefix=f"s{i}_"))
    with src_conn.cursor() as cur:
        cur.execute("SELECT " + ", ".join(parts), params)
        same = list(cur.fetchone()) == [p for _, p in tables]
    target, ledger_table = spec.staging_target, TableName.parse(spec.ledger_table)
    params = {
        **_fingerprint_params(dst_conn, target, keys=True, prefix="t_"),
        **_fingerprint_params(dst_conn, spec.destination, keys=False, prefix="l_"),
        "ledger": psql.Identifier(*ledger_table.parts).as_string(dst_conn),
    }
    live = "(" + _fingerprint_sql(dst_conn, "l_") + ")" if spec.mode == "swap" else "''"
    with dst_conn.cursor() as cur:
        cur.execute(
            "SELECT (" + _fingerprint_sql(dst_conn, "t_") + "), " + live + ", s.* FROM (" + ledger.STATE_SQL + ") AS s",
            params,
        )
        dest_print, live_print, *state = cur.fetchone()
    same = same and dest_print == facts.dest_print and (live_print or "") == prepared.live_print
    return same, ledger.is_ready(state)


def ready(
    spec: BackfillSpec, chunk: Chunk, src_conn, dst_conn, prepared: PreparedRun | None, *, source: str | None = None
) -> Ready:
    """What ``chunk`` runs with: from ``prepared`` after one fingerprint statement per side, else (none given,
    made for another spec, or a table changed since) prepared here from the catalogs before any write."""
    facts = prepared.ranges.get(key(spec, chunk)) if prepared is not None and prepared.spec == spec_tag(spec) else None
    if prepared is not None and facts is not None:
        same, ledger_ready = _check(spec, prepared, facts, src_conn, dst_conn)
        if same:
            if not ledger_ready:
                ledger.ensure_table(dst_conn, TableName.parse(spec.ledger_table))
            k = key(spec, chunk)
            if k not in prepared.plans:
                # a user-defined type may change without the table's own rows: then read the column plan again
                fresh = facts if facts.carriable else read(spec, src_conn, dst_conn, chunk, prints=False)
                prepared.plans[k] = plan_from(spec, fresh, chunk)
            src_table, plan = prepared.plans[k]
            return Ready(src_table, plan, prepared.backfill)
        log.info("chunk %s: a table changed since the plan (fingerprint): preparing it again", chunk.chunk_id)
    # pre-flight (catalog reads only) before the first write, the ledger DDL: a bad spec writes nothing
    # (swap mode: checked against the live table, which the parallel one is created LIKE)
    live = swap.as_live(spec)
    src_table, plan = plan_from(live, read(live, src_conn, dst_conn, chunk, prints=False), chunk)
    if spec.mode == "swap":
        swap.ensure_parallel_table(dst_conn, spec)  # <table>_backfill if not there; refuses a foreign one
        # its own columns, if it predates a change of the live table
        src_table, plan = plan_from(spec, read(spec, src_conn, dst_conn, chunk, prints=False), chunk)
    backfill = identity.of(spec, src_conn, dst_conn, source_conn_id=source)
    ledger.ensure_table(dst_conn, TableName.parse(spec.ledger_table))
    return Ready(src_table, plan, backfill)
