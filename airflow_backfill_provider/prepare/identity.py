"""What a backfill IS, independent of how its spec spells things: resolved relations and a fingerprint.

The ledger and the chunk lock are keyed by the backfill, not by (target table, range): two specs that
load ``orders_us`` and ``orders_eu`` into one ``orders`` are two backfills and each loads everything;
``orders`` and ``public.orders`` (the same relation through the search_path) are one.

    target      the destination relation the chunks write, resolved:  "public"."orders" -> public.orders
    key         sha256 over: source database (system identifier + current_database()), every resolved
                source relation, the resolved destination, and what selects rows (time column, timezone,
                historical ranges and their expressions, a source view's definition); and what the ledger's
                "done" claims about the
                destination as it physically is: the destination table's OID (a table dropped and
                re-created is another table, whose rows nobody loaded) and what a chunk writes (per source
                range, each written column with its destination type and what fills it from the source;
                key and version columns, conflict policy, allowed lossy casts). A change in any of these
                makes every range "not done" again: a rerun is cheap (an unchanged row is not rewritten).
    description the same, as readable JSON (stored in the ledger next to the key); :func:`explain` says
                why an earlier description's claims do not count for this one (the plan logs it)

Relations are written ``format('%I.%I', schema, name)``: ``public.orders`` for ordinary names (the
spelling the previous release stored for qualified names), unambiguous for names with dots or quotes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.core.spec import BackfillSpec, TableName

# the schema the name resolves to: the given one, else the first search_path schema holding it; a missing
# table resolves to the schema CREATE TABLE would use (current_schema()), or NULL for a source
_RESOLVE = """
SELECT format('%%I.%%I', coalesce(%(schema)s, (
         SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relname = %(name)s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
            AND n.nspname = ANY (current_schemas(false))
          ORDER BY array_position(current_schemas(false), n.nspname) LIMIT 1),
         CASE WHEN %(missing_ok)s THEN current_schema() END), %(name)s)
"""

# system_identifier tells two clusters apart (a standby shares it with its primary: same data, same key);
# PUBLIC may execute pg_control_system() by default, but a hardened server may have revoked it
_SOURCE_DB = """
SELECT current_database(),
       CASE WHEN has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')
            THEN (SELECT system_identifier::text FROM pg_catalog.pg_control_system()) END
"""

# the source side of a fingerprint in one round trip: database identity and every source relation resolved
# (a missing relation comes back NULL); same resolution rule as _RESOLVE
_SOURCE_SIDE = """
SELECT current_database(),
       CASE WHEN has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')
            THEN (SELECT system_identifier::text FROM pg_catalog.pg_control_system()) END,
       (SELECT array_agg(CASE WHEN coalesce(u.s, f.nsp) IS NOT NULL THEN format('%%I.%%I', coalesce(u.s, f.nsp), u.n) END
                         ORDER BY u.ord)
          FROM unnest(%(schemas)s::text[], %(names)s::text[]) WITH ORDINALITY AS u(s, n, ord)
          LEFT JOIN LATERAL (
                SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relname = u.n AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                   AND n.nspname = ANY (current_schemas(false))
                 ORDER BY array_position(current_schemas(false), n.nspname) LIMIT 1) AS f(nsp) ON u.s IS NULL)
"""

# a source view's (or materialized view's) definition, normalised by the server: which rows it selects and how
_DEFINITIONS = """
SELECT u.n, md5(pg_get_viewdef(c.oid))
  FROM unnest(%(names)s::text[]) AS u(n) JOIN pg_class c ON c.oid = to_regclass(u.n)
 WHERE c.relkind IN ('v', 'm')
"""

#: spec fields that decide which source rows a chunk selects (and how they are read); a field another
#: release adds (e.g. a row filter) is picked up by name when present
SELECTION_FIELDS = ("time_column", "timezone", "historical", "row_filter", "where")


def resolve(conn, table: TableName, *, side: str, missing_ok: bool = False) -> str:
    """``schema.name`` of the relation ``table`` means on ``conn`` (search_path applied)."""
    with conn.cursor() as cur:
        cur.execute(_RESOLVE, {"schema": table.schema_, "name": table.name, "missing_ok": missing_ok})
        row = cur.fetchone()
    if row is None or row[0] is None:
        where = f"schema {table.schema_!r}" if table.schema_ else "the search_path"
        raise PermanentChunkError(
            f"{side} table {str(table)!r} does not exist in {where} of database "
            f"{conn.get_dsn_parameters().get('dbname')!r}; check {side}_table in the spec"
        )
    return row[0]


def source_database(conn, conn_id: str) -> str:
    """The source database's identity: system identifier + database name (conn id if the former is hidden)."""
    with conn.cursor() as cur:
        cur.execute(_SOURCE_DB)
        dbname, sysid = cur.fetchone()
    return _database_key(dbname, sysid, conn_id)


def _database_key(dbname: str, sysid: str | None, conn_id: str) -> str:
    if sysid:
        return f"sysid:{sysid}/{dbname}"
    # a DSN may carry a password: the ledger stores a digest of it, never the text
    shown = (
        f"dsn:{hashlib.sha256(conn_id.encode()).hexdigest()[:12]}" if ("://" in conn_id or "=" in conn_id) else conn_id
    )
    return f"conn:{shown}/{dbname}"


@dataclass(frozen=True)
class BackfillIdentity:
    target: str  # resolved destination relation the chunks write (the ledger's target_table)
    key: str  # fingerprint (hex): the ledger key and part of the chunk lock
    description: dict

    def lock_key(self, start, end) -> str:
        """The chunk's advisory-lock key: the same backfill and range serialize, other backfills do not."""
        return f"{self.target}|{self.key}|{start.isoformat()}|{end.isoformat()}"


def source_tables(spec: BackfillSpec) -> list[TableName]:
    """Every source relation the spec reads: the main one and each historical range's."""
    tables = [spec.source]
    for rng in spec.historical:
        if rng.source_table:
            tables.append(TableName.parse(rng.source_table))
    return tables


def of(spec: BackfillSpec, src_conn, dst_conn, *, source_conn_id: str | None = None) -> BackfillIdentity:
    """The backfill ``spec`` describes, resolved on these sessions (a few catalog lookups)."""
    from airflow_backfill_provider.prepare import catalog as schema

    target = resolve(dst_conn, spec.staging_target, side="destination", missing_ok=spec.mode == "swap")
    tables = source_tables(spec)
    with src_conn.cursor() as cur:
        cur.execute(_SOURCE_SIDE, {"schemas": [t.schema_ for t in tables], "names": [t.name for t in tables]})
        dbname, sysid, resolved = cur.fetchone()
    for table, name in zip(tables, resolved):
        if name is None:
            resolve(src_conn, table, side="source")  # raises the missing-table error
    sources = {str(t): name for t, name in zip(tables, resolved)}
    with src_conn.cursor() as cur:
        cur.execute(_DEFINITIONS, {"names": sorted(set(resolved))})
        definitions = dict(cur.fetchall())
    selection = _selection(spec)
    # historical ranges name their table as spelled: replace with the resolved relation
    for rng in selection.get("historical", []):
        if rng.get("source_table"):
            rng["source_table"] = sources[str(TableName.parse(rng["source_table"]))]
    # the live destination (swap mode: the parallel table is created LIKE it and merged into it)
    dest_oid = schema.table_oid(dst_conn, spec.destination, side="destination")
    dest_cols = schema.table_columns(dst_conn, spec.destination, side="destination")
    src_cols = {str(t): schema.table_columns(src_conn, t, side="source") for t in {str(t): t for t in tables}.values()}
    description = {
        "source_database": _database_key(dbname, sysid, source_conn_id or spec.source_conn_id),
        "source": sources[str(spec.source)],
        "destination": target,
        "selection": selection,
        "destination_oid": dest_oid,
        "write": _write(spec, dest_cols, src_cols),
    }
    if definitions:  # only views have one: a table source's identity (and its ledger rows' key) is unchanged
        description["source_definitions"] = definitions
    return from_description(target, description)


def _write(spec: BackfillSpec, dest_cols, src_cols: dict) -> dict:
    """What a chunk writes, per source range: [[column, destination type, what fills it], ...]."""
    from airflow_backfill_provider.prepare import drift

    types = {c.name: c.type_sql for c in dest_cols}
    ranges: list[tuple[str, str, dict[str, str]]] = [("", str(spec.source), {})] + [
        (
            str(r.until),
            str(TableName.parse(r.source_table)) if r.source_table else str(spec.source),
            r.column_expressions,
        )
        for r in spec.historical
    ]
    out = {}
    for until, table, expressions in ranges:
        src = {c.name: c.type_sql for c in src_cols[table]}
        try:
            written, _ = drift.written_columns(spec, dest_cols, set(src), expressions)
        except PermanentChunkError:  # the plan's pre-flight names it; the identity only records what is
            written = []
        out[until or "current"] = [
            [c, types[c], f"expr:{expressions[c]}" if c in expressions else (f"col:{src[c]}" if c in src else None)]
            for c in written
        ]
    return {
        "columns": out,
        "key_columns": list(spec.key_columns),
        "version_column": spec.version_column,
        "conflict_policy": None if spec.version_column else spec.conflict_policy,
        "allow_lossy_casts": spec.allow_lossy_casts,
    }


def explain(old: dict | None, new: dict) -> str | None:
    """Why ledger rows recorded under ``old`` do not count as done for ``new``; None when ``old`` is another
    backfill (another source or selection: its rows are its own, not a stale claim of this one)."""
    if not isinstance(old, dict):
        return None
    if any(old.get(k) != new.get(k) for k in ("source_database", "source", "destination")):
        return None
    if json.dumps(old.get("selection"), sort_keys=True) != json.dumps(new.get("selection"), sort_keys=True):
        return None
    if "destination_oid" not in old:
        return "recorded by an earlier release, which did not record which table and columns it wrote"
    if old["destination_oid"] != new.get("destination_oid"):
        return (
            f"the destination table {new.get('destination')} was dropped and re-created since "
            f"(oid {old['destination_oid']} then, {new.get('destination_oid')} now): the rows they claim are gone"
        )
    was_defs, now_defs = old.get("source_definitions") or {}, new.get("source_definitions") or {}
    if was_defs != now_defs:
        changed = sorted(n for n in set(was_defs) | set(now_defs) if was_defs.get(n) != now_defs.get(n))
        return (
            f"the source view(s) {', '.join(changed)} were redefined since (CREATE OR REPLACE VIEW): the rows "
            "they select now may differ from the rows loaded then"
        )
    was, now = old.get("write") or {}, new.get("write") or {}
    why = []
    for field in ("key_columns", "version_column", "conflict_policy", "allow_lossy_casts"):
        if was.get(field) != now.get(field):
            why.append(f"{field} {was.get(field)!r} -> {now.get(field)!r}")
    old_cols, new_cols = was.get("columns") or {}, now.get("columns") or {}
    for rng in sorted(set(old_cols) | set(new_cols)):
        a = {c[0]: c[1:] for c in old_cols.get(rng, [])}
        b = {c[0]: c[1:] for c in new_cols.get(rng, [])}
        where = "" if rng == "current" else f" (historical range until {rng})"
        if set(b) - set(a):
            why.append(f"column(s) {sorted(set(b) - set(a))} now written{where}")
        if set(a) - set(b):
            why.append(f"column(s) {sorted(set(a) - set(b))} no longer written{where}")
        changed = sorted(c for c in set(a) & set(b) if a[c] != b[c])
        if changed:
            why.append(f"column(s) {changed} changed type or source{where}")
    return "what a chunk writes changed: " + "; ".join(why) if why else "what a chunk writes changed"


def _selection(spec: BackfillSpec) -> dict:
    dumped = spec.model_dump(mode="json")
    return {f: dumped[f] for f in SELECTION_FIELDS if dumped.get(f) not in (None, [], {})}


def from_description(target: str, description: dict) -> BackfillIdentity:
    """The identity a description stands for (its key is the description's digest): a prepared run carries it."""
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return BackfillIdentity(target, hashlib.sha256(canonical.encode()).hexdigest()[:32], description)
