"""How each column travels from the source type S to the destination type T, read from both catalogs.

Three questions per column, answered here so the transfer, live ingest and the cast check agree:

1. **Where is it cast?** Same type: nowhere (the fast path). A cast that cannot lose information
   (``int -> bigint``, ``text -> varchar(n)``, ...) to a type the source knows: on the source, as
   before. Anything else, i.e. a cast that may round (``numeric(12,4) -> numeric(12,2)``,
   ``numeric -> integer``, ``float8 -> float4``, ``timestamp(6) -> timestamp(0)``,
   ``timestamptz -> date``), a type only the destination has (an enum, citext, ...) or a domain: the
   source sends its own representation (a built-in type; text for anything else) into a staging
   column of that type and the destination casts in the upsert, so (a) the cast runs where the
   type exists, (b) a rounding can be checked before anything is written, and (c) a value the type
   rejects (enum label, domain CHECK) can be named (castcheck.find_failure_in_stage).
2. **Is a length ever cut?** Never. An explicit cast to ``varchar(n)``, ``char(n)``, ``bit(n)``
   (also inside arrays and domains) silently truncates or pads; casts here go to the type *without*
   its length, and the length is enforced by COPY into the typed staging column or by assignment
   into the destination column, both of which raise instead.
3. **Has a row changed?** The newer-wins upsert rewrites a row only if a column differs. ``=`` is
   not identity for every type (``numeric`` 1.0 = 1.00, float -0 = 0, ``interval`` '1 day' =
   '24 hours', jsonb, citext) and does not exist for some (json, xml, point). Types whose ``=`` is
   identity are compared natively (fast); all others by their binary send function (exact bytes,
   independent of session settings), else by text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from psycopg2 import sql

# Catalog facts per column, domains resolved to their base type (domain typmod carried over).
# ``{find}``: the table lookup (schema.FIND_TABLE), so this is one round trip.
TYPES_SQL = """
WITH RECURSIVE rel AS ({find}), cols AS (
  SELECT a.attname, a.attnum, a.atttypid, a.atttypmod, a.attcollation
    FROM pg_attribute a
   WHERE a.attrelid = (SELECT oid FROM rel) AND a.attnum > 0 AND NOT a.attisdropped
), base(attname, typ, mod) AS (
  SELECT attname, atttypid, atttypmod FROM cols
  UNION ALL
  SELECT b.attname, t.typbasetype, CASE WHEN t.typtypmod <> -1 THEN t.typtypmod ELSE b.mod END
    FROM base b JOIN pg_type t ON t.oid = b.typ
   WHERE t.typtype = 'd'
)
SELECT c.attname, format_type(c.atttypid, c.atttypmod), c.atttypid < 16384,
       format_type(bt.oid, b.mod), format_type(bt.oid, NULL), bt.oid < 16384, b.mod, bt.typname, bt.typtype,
       el.typname, el.oid < 16384, el.typtype,
       coalesce(coll.collisdeterministic, true), sn.nspname, sp.proname
  FROM cols c
  JOIN base b ON b.attname = c.attname
  JOIN pg_type bt ON bt.oid = b.typ AND bt.typtype <> 'd'
  LEFT JOIN pg_type el ON el.oid = bt.typelem AND bt.typsubscript = 'array_subscript_handler'::regproc
  LEFT JOIN pg_collation coll ON coll.oid = c.attcollation
  LEFT JOIN pg_proc sp ON sp.oid = bt.typsend
  LEFT JOIN pg_namespace sn ON sn.oid = sp.pronamespace
 ORDER BY c.attnum
"""


# '=' is identity for these (same value <=> same representation), with a deterministic collation
_IDENTITY_EQ = {
    "bool",
    "int2",
    "int4",
    "int8",
    "oid",
    "text",
    "varchar",
    "name",
    "bytea",
    "date",
    "time",
    "timestamp",
    "timestamptz",
    "uuid",
    "money",
    "macaddr",
    "macaddr8",
    "bit",
    "varbit",
    "inet",
    "cidr",
    "char",
}
# ... and for these only with a typmod: numeric(p,s) stores every value at scale s; char(n) pads to n
_IDENTITY_EQ_WITH_TYPMOD = {"numeric", "bpchar"}
# '=' exists (values compare by meaning): usable to ask "did the cast change the value?"
_SEMANTIC_EQ = _IDENTITY_EQ | _IDENTITY_EQ_WITH_TYPMOD | {"float4", "float8", "interval", "jsonb", "timetz"}
_STRING = {"text", "varchar", "bpchar", "name"}
# explicit casts to these with a length cut or pad silently; cast to the unbounded type instead
_UNBOUNDED = {"varchar": "character varying", "bpchar": "bpchar", "bit": "bit varying", "varbit": "bit varying"}
_INTS = ("int2", "int4", "int8")
_TIME_PRECISION = {"timestamp", "timestamptz", "time", "timetz"}


@dataclass(frozen=True)
class TypeInfo:
    type_sql: str  # the column's type, format_type() (valid SQL on that database)
    builtin: bool  # created by initdb: same name and OID on every server of this major version
    base_sql: str  # domains resolved to the base type, with the typmod in force
    base_nomod_sql: str  # the base type without typmod
    base_builtin: bool
    base_mod: int
    base_name: str  # pg_type.typname of the base, e.g. 'numeric', 'varchar', '_int4'
    base_typtype: str  # b base, e enum, r range, c composite, m multirange, p pseudo
    elem_name: str | None  # arrays: the element's typname
    elem_builtin: bool | None
    elem_typtype: str | None
    deterministic: bool  # the column's collation compares bytes (or the type is not collatable)
    send_fn: tuple[str, str] | None  # (schema, name) of the binary send function

    @property
    def scalar(self) -> str:
        """The scalar kind: the base type's name, or for an array its element's."""
        return self.elem_name if self.elem_name else self.base_name

    @property
    def portable(self) -> bool:
        """Binary COPY carries it between databases without relying on OIDs: arrays and composites write
        their element types' OIDs into the stream, and a user-defined type has another OID in each
        database. The receiver checks that OID for some types (bit vs varbit arrays: refused) and not
        for others (enum arrays across databases: accepted, tried on 15); such columns go as text,
        which names types by label, not OID. Scalars (enum, domain, range) are fine."""
        if self.base_typtype == "c":
            return False
        return not (self.elem_name and not self.elem_builtin)

    @property
    def identity_eq(self) -> bool:
        """``IS DISTINCT FROM`` on this type is an exact change test."""
        if not self.deterministic:
            return False
        kind = self.scalar
        if self.elem_name and (not self.elem_builtin or self.elem_typtype == "d"):
            return self.elem_typtype == "e"
        if kind in _IDENTITY_EQ or (self.elem_name is None and self.base_typtype == "e"):
            return True
        return kind in _IDENTITY_EQ_WITH_TYPMOD and self.base_mod != -1

    @property
    def semantic_eq(self) -> bool:
        if self.elem_name and not self.elem_builtin:
            return self.elem_typtype == "e"
        return self.scalar in _SEMANTIC_EQ or self.base_typtype in ("e", "r")


def type_infos(rows) -> dict[str, TypeInfo]:
    """Column name -> TypeInfo from the rows of :data:`TYPES_SQL`."""
    # each row: the column name, TypeInfo's fields in order, then the schema and name of its binary send function
    fields = [f.name for f in dataclasses.fields(TypeInfo) if f.name != "send_fn"]
    out = {}
    for name, *facts, nsp, fn in rows:
        out[name] = TypeInfo(**dict(zip(fields, facts, strict=True)), send_fn=(nsp, fn) if fn else None)
    return out


def unbounded(t: TypeInfo) -> str:
    """What to cast to so that the destination, not the cast, enforces T's length (and T's domain
    constraints): the base type, minus a length limit (also for arrays)."""
    if t.elem_name in _UNBOUNDED:
        return _UNBOUNDED[t.elem_name] + "[]"
    if t.elem_name is None and t.base_name in _UNBOUNDED:
        return _UNBOUNDED[t.base_name]
    return t.base_sql


def source_castable(t: TypeInfo) -> bool:
    """The source can send T's binary form itself, by a cast to :func:`unbounded` of T: a built-in,
    non-domain type (a domain's constraints are checked in the destination's upsert, where a failing
    value can be named), and not ``bit(n)[]``, whose unbounded form ``varbit[]`` carries another
    element OID, which the destination's binary COPY refuses (tried)."""
    return t.base_builtin and t.portable and t.type_sql == t.base_sql and t.elem_name != "bit"


def _numeric_scale(mod: int) -> int:
    return (mod - 4) & 0xFFFF


def lossless(s: TypeInfo, t: TypeInfo) -> bool:
    """True if casting S to T never changes a value silently: the value is kept exactly, or the cast
    raises (overflow, length, invalid input). Conservative: False means "check each value"."""
    if t.base_typtype == "d":  # not reached: domains are resolved
        return False
    if (s.elem_name is None) != (t.elem_name is None):
        return t.scalar in _STRING and t.elem_name is None  # anything -> text is its text form
    sk, tk = s.scalar, t.scalar
    if tk in _STRING or (tk in ("json", "jsonb", "xml") and (sk in _STRING or sk in ("json", "jsonb"))):
        return True  # a string keeps the text form (a too-long one raises); json -> jsonb normalizes by design
    if sk in _STRING:
        # parsing text: only a typmod can round (text -> numeric(12,2)); checked by comparing with T unbounded
        return t.base_mod == -1 or tk in _UNBOUNDED
    if sk == tk:
        if t.base_mod == -1 or t.base_mod == s.base_mod or tk in _UNBOUNDED:
            return True
        if s.base_mod == -1:
            return False
        if tk == "numeric":
            return _numeric_scale(t.base_mod) >= _numeric_scale(s.base_mod)
        return tk in _TIME_PRECISION and t.base_mod >= s.base_mod
    if sk in _INTS and tk in _INTS:
        return True  # narrowing raises on overflow, never rounds
    if sk in _INTS and tk == "numeric":
        return True  # an integer has no fraction to round; too many digits raise
    widen = {
        ("int2", "float4"),
        ("int2", "float8"),
        ("int4", "float8"),
        ("float4", "float8"),
        ("date", "timestamp"),
        ("date", "timestamptz"),
        ("bit", "varbit"),
        ("varbit", "bit"),
        ("cidr", "inet"),
    }
    return (sk, tk) in widen


def change_test(column: str, t: TypeInfo, left: str = "t", right: str = "excluded") -> sql.Composed:
    """``left.c`` and ``right.c`` differ in representation (NULLs compare as values)."""
    lc, rc = sql.Identifier(left, column), sql.Identifier(right, column)
    if t.type_sql != t.base_sql:  # a domain: compare as its base type (no '=' resolves for a domain over an enum)
        base = sql.SQL(t.base_sql)  # from the destination catalog
        lc, rc = (sql.SQL("{}::{}").format(x, base) for x in (lc, rc))
    if t.identity_eq:
        return sql.SQL("{l} IS DISTINCT FROM {r}").format(l=lc, r=rc)
    if t.send_fn:
        fn = sql.Identifier(*t.send_fn)
        return sql.SQL("{f}({l}) IS DISTINCT FROM {f}({r})").format(f=fn, l=lc, r=rc)
    return sql.SQL("{l}::text IS DISTINCT FROM {r}::text").format(l=lc, r=rc)


def changed_predicate(columns: list[str], types: dict[str, TypeInfo]) -> sql.Composed:
    """``(c1 differs OR c2 differs ...)`` for the upsert's "rewrite only if something changed"."""
    return sql.SQL("({})").format(sql.SQL(" OR ").join(change_test(c, types[c]) for c in columns))


def rounding_test(column: str, wire: TypeInfo, wire_sql: str, t: TypeInfo) -> tuple[sql.Composed, sql.Composed] | None:
    """(predicate, value after the cast) over a staging column of type ``wire_sql`` holding the source
    value: true where casting it to T changes it. None when there is nothing that could be compared."""
    c = sql.Identifier(column)
    # T's base type (typmods included): a domain's own constraints are checked when the row is written
    cast_t = sql.SQL(t.base_sql)  # from the destination catalog
    after = sql.SQL("({c}::{t})").format(c=c, t=cast_t)
    if wire.scalar in _STRING:
        if t.base_mod == -1:
            return None  # parsing is exact or raises
        # text '1.234' -> numeric(12,2): compare with the same parse without the typmod
        pred = sql.SQL("{a} IS DISTINCT FROM {c}::{n}").format(a=after, c=c, n=sql.SQL(t.base_nomod_sql))
        if not t.semantic_eq:
            pred = sql.SQL("{a}::text IS DISTINCT FROM ({c}::{n})::text").format(
                a=after, c=c, n=sql.SQL(t.base_nomod_sql)
            )
        return pred, after
    back = sql.SQL("{a}::{w}").format(a=after, w=sql.SQL(wire_sql))
    if wire.semantic_eq:
        return sql.SQL("{b} IS DISTINCT FROM {c}").format(b=back, c=c), after
    return sql.SQL("{b}::text IS DISTINCT FROM {c}::text").format(b=back, c=c), after
