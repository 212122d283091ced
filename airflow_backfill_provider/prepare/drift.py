"""Schema drift: how the source's columns map onto the destination's, per column, and why.

The destination schema is the truth (current-schema mode): every destination column is filled;
one missing from the source is selected as ``NULL::<type>``; source-only columns are ignored;
a historical range's expressions (spec ``historical``) win over same-name columns; everything is cast
to the destination type, on the source where it is exact, else in the destination (prepare/casts.py), so
binary COPY lines up exactly. Each choice is a decision the plan task logs. What happens after a
cast fails or would round is transfer/castcheck.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from psycopg2 import sql

from airflow_backfill_provider.prepare import casts
from airflow_backfill_provider.core.exceptions import PermanentChunkError
from airflow_backfill_provider.prepare.catalog import Column
from airflow_backfill_provider.core.spec import BackfillSpec


@dataclass(frozen=True)
class LossyCast:
    """A cast that may round (numeric scale, float precision, fractions, time precision, timestamp -> date)."""

    column: str
    source_type: str
    type_sql: str
    changes: sql.Composable  # over the staging table: true where the cast changes the value
    after: sql.Composable  # the value after the cast


@dataclass
class ColumnPlan:
    """What one chunk selects from the source, per destination column, and why.

    ``raw_exprs[i]`` is what is read from the source for ``columns[i]`` before the cast (None for a
    column loaded as NULL) and ``types[i]`` its destination type; the cast-failure check uses both.
    ``time_filter`` is what the chunk's ``[start, end)`` is compared with on the source.
    """

    columns: list[str]
    select_exprs: list[sql.Composable]
    decisions: list[str] = field(default_factory=list)
    raw_exprs: list[sql.Composable | None] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    time_filter: sql.Composable | None = None
    #: the source's catalog type of a plain time column (None for a historical expression)
    time_source_type: str | None = None
    #: the source column ``time_filter`` is (a historical expression naming one column counts); None for
    #: a computed expression. What the plan checks for an index and for NULL rows.
    time_filter_column: str | None = None
    #: date / timestamp / timestamptz of ``time_filter`` on the source, set by source.prepare (core/timebounds.py)
    time_kind: str | None = None
    # how values travel (prepare/casts.py); filled when both catalogs' type facts were given to plan_columns
    copy_exprs: list[sql.Composable] = field(default_factory=list)  # what the source COPY selects
    stage_types: list[str | None] = field(default_factory=list)  # staging column type; None: the destination's
    insert_exprs: list[sql.Composable] = field(default_factory=list)  # staging -> destination (cast if needed)
    dest_casts: list[str | None] = field(default_factory=list)  # the type cast to in the destination, if any
    # castcheck on the source: (variable type, cast type) per column; None: not cast on the source
    check_types: list[tuple[str, str] | None] = field(default_factory=list)
    lossy: list[LossyCast] = field(default_factory=list)  # casts to verify value by value on the staging table
    changed: sql.Composable | None = None  # "a non-key column differs", exact per type (upsert predicate)
    #: written columns that are GENERATED ALWAYS AS IDENTITY in the destination (the upsert overrides them)
    identity_always: list[str] = field(default_factory=list)

    @property
    def filter_kind(self) -> str:
        """``time_kind``, which source.prepare sets (a plan made without the source's catalog has none)."""
        if self.time_kind is None:
            raise RuntimeError("the column plan has no time kind: make it with source.prepare")
        return self.time_kind

    def expr_for(self, column: str) -> sql.Composable:
        """The select expression (cast to the destination type) of one destination column."""
        return self.select_exprs[self.columns.index(column)]


def plan_columns(
    spec: BackfillSpec,
    dest_cols: list[Column],
    src_cols: list[Column],
    *,
    expressions: dict[str, str] | None = None,
    dest_types: dict[str, casts.TypeInfo] | None = None,
    src_types: dict[str, casts.TypeInfo] | None = None,
) -> ColumnPlan:
    """One select expression per destination column, cast to the destination type.

    ``expressions`` (historical mode) are spec-author SQL for a column; they win over same-name columns.
    With both sides' type facts (:func:`describe_types`), also how each value travels (see prepare/casts.py):
    the chunk path passes them; validation, which only reads the source, does not need them.
    """
    expressions = expressions or {}
    by_name = {c.name: c for c in dest_cols}
    src_names = {c.name for c in src_cols}
    for required in (spec.time_column, *spec.key_columns):
        if required not in src_names and required not in expressions:
            raise PermanentChunkError(
                f"source table {spec.source_table!r} has no column {required!r} (needed as time/key column); "
                f"its columns are {sorted(src_names)}"
            )
    wanted, left_out = written_columns(spec, dest_cols, src_names, expressions)
    src_type_sql = {c.name: c.type_sql for c in src_cols}
    exprs: list[sql.Composable] = []
    raws: list[sql.Composable | None] = []
    decisions: list[str] = []
    for name in wanted:
        col = by_name[name]
        type_sql = sql.SQL(cast_type(col.type_sql))  # from the destination catalog, not from user input
        if name in expressions:
            # trusted spec-author SQL (historical mode); wrapped so operator precedence cannot leak
            raw = sql.SQL("({e})").format(e=sql.SQL(expressions[name]))
            exprs.append(sql.SQL("{r}::{t}").format(r=raw, t=type_sql))
            decisions.append(f"{name}: expression ({expressions[name]}) cast to {col.type_sql}")
        elif name in src_names:
            raw = sql.Identifier(name)
            exprs.append(sql.SQL("{c}::{t}").format(c=raw, t=type_sql))
            if src_type_sql[name] != col.type_sql:
                decisions.append(f"{name}: source type {src_type_sql[name]} cast to {col.type_sql}")
        else:
            raw = None
            exprs.append(sql.SQL("NULL::{t}").format(t=type_sql))
            decisions.append(f"{name}: missing in source, loaded as NULL::{col.type_sql}")
        raws.append(raw)
    decisions += left_out
    ignored = sorted(src_names - set(by_name))
    if ignored:
        decisions.append(f"source-only columns ignored: {ignored}")
    t = spec.time_column
    # a historical expression for the time column is also what the chunk range is compared with
    time_filter = sql.SQL("({e})").format(e=sql.SQL(expressions[t])) if t in expressions else sql.Identifier(t)
    plan = ColumnPlan(
        columns=list(wanted),
        select_exprs=exprs,
        decisions=decisions,
        raw_exprs=raws,
        types=[by_name[n].type_sql for n in wanted],
        time_filter=time_filter,
        time_source_type=None if t in expressions else src_type_sql.get(t),
        time_filter_column=_named_column(expressions[t], src_names) if t in expressions else t,
        copy_exprs=list(exprs),
        stage_types=[None] * len(wanted),
        insert_exprs=[sql.Identifier(n) for n in wanted],
        dest_casts=[None] * len(wanted),
        check_types=[(by_name[n].type_sql, cast_type(by_name[n].type_sql)) for n in wanted],
        identity_always=[n for n in wanted if by_name[n].identity == "a"],
    )
    if dest_types is not None and src_types is not None:
        _route(spec, plan, dest_types, src_types)
    return plan


def written_columns(
    spec: BackfillSpec, dest_cols: list[Column], src_names: set[str], expressions: dict[str, str]
) -> tuple[list[str], list[str]]:
    """The destination columns a chunk writes, and a decision line per column it leaves to the table.

    A column the source range cannot give (not in the source, no historical expression) and the table
    fills itself (a DEFAULT, an identity, a generated column) is left out of the write; a generated column
    is never written (PostgreSQL refuses it). A column nothing fills (NOT NULL, no default, not in the
    source) is refused here, before any chunk writes: every row would fail. Otherwise a missing column is
    loaded as NULL (drift: the destination schema is the truth).
    """
    by_name = {c.name: c for c in dest_cols}
    wanted = spec.columns or [c.name for c in dest_cols]
    generated = [n for n in spec.columns or [] if by_name[n].generated]
    if generated:
        raise PermanentChunkError(
            f"columns {generated} of the destination are GENERATED ALWAYS AS (...): PostgreSQL computes them and "
            "refuses a written value; remove them from the spec's columns (the destination fills them)"
        )
    out: list[str] = []
    notes: list[str] = []
    for name in wanted:
        col = by_name[name]
        if col.generated:
            notes.append(f"{name}: generated in the destination, not written (the destination computes it)")
        elif name in src_names or name in expressions:
            out.append(name)
        elif col.filled_by_table:
            what = "an identity" if col.identity else "a default"
            notes.append(f"{name}: missing in source, not written: the destination fills it ({what})")
        else:
            out.append(name)
    # NOT NULL and nothing fills it: left out of the write, or missing in the source (loaded as NULL)
    unfilled = [
        c.name
        for c in dest_cols
        if c.not_null
        and not c.filled_by_table
        and (c.name not in out or (c.name not in src_names and c.name not in expressions))
    ]
    if unfilled:
        where = f"source table {spec.source_table!r}" + (" (or its historical ranges)" if spec.historical else "")
        raise PermanentChunkError(
            f"destination column(s) {unfilled} are NOT NULL without a default, and "
            + ("not in the spec's columns" if spec.columns else f"missing in the {where}")
            + ": every row would fail. Give them a default in the destination (ALTER TABLE ... ALTER COLUMN "
            f"{unfilled[0]} SET DEFAULT ...), make them nullable, or load them: add them to the source, to a "
            "historical range's expressions, or to columns:"
        )
    return out, notes


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def _named_column(expr: str, names: set[str]) -> str | None:
    """The source column ``expr`` is exactly (``created``, ``CREATED`` or ``"Created"``), matched against the
    catalog's names the way PostgreSQL resolves them (unquoted folds to lower case); None otherwise."""
    text = expr.strip()
    if _IDENTIFIER.fullmatch(text):
        return text.lower() if text.lower() in names else None
    for name in names:
        if text == '"' + name.replace('"', '""') + '"':
            return name
    return None


def _lossy_allowed(spec: BackfillSpec, column: str) -> bool:
    allowed = spec.allow_lossy_casts
    return allowed is True or (isinstance(allowed, list) and column in allowed)


def _route(spec: BackfillSpec, plan: ColumnPlan, dest_types: dict, src_types: dict) -> None:
    """Decide per column where the cast runs and what the staging column holds (module doc of prepare/casts.py)."""
    if isinstance(spec.allow_lossy_casts, list):
        unknown = [c for c in spec.allow_lossy_casts if c not in plan.columns]
        if unknown:
            raise PermanentChunkError(
                f"allow_lossy_casts lists {unknown}, which are not loaded columns of the destination "
                f"(loaded: {plan.columns}); fix the names or remove them"
            )
    for i, name in enumerate(plan.columns):
        t = dest_types.get(name)
        if t is None:
            continue
        col = sql.Identifier(name)
        raw = plan.raw_exprs[i]
        # the source can produce T's wire format by a cast to a built-in type: stage as T itself
        source_side = casts.source_castable(t)
        to_t = sql.SQL(casts.unbounded(t))  # destination catalog text, not user input
        s = src_types.get(name) if isinstance(raw, sql.Identifier) else None
        if s is not None and s.type_sql == t.type_sql:
            if t.portable:  # the same type on both sides: no cast anywhere
                plan.copy_exprs[i], plan.check_types[i] = col, None
                continue
            source_side = False
        elif s is not None and not (casts.lossless(s, t) and source_side):
            # may round, or T only exists in the destination: stage the source's own value, cast there
            # text when T holds user-defined elements: an explicit array cast to a length-limited domain
            # element cuts silently, while parsing the array's text checks every element
            if s.base_builtin and s.portable and t.portable:
                wire_info, wire = s, s.base_sql
                plan.copy_exprs[i] = (
                    col if s.type_sql == s.base_sql else sql.SQL("{c}::{w}").format(c=col, w=sql.SQL(wire))
                )
            else:
                wire_info, wire = None, "text"
                plan.copy_exprs[i] = sql.SQL("{c}::text").format(c=col)
            plan.stage_types[i] = wire
            plan.insert_exprs[i] = sql.SQL("{c}::{t}").format(c=col, t=to_t)
            plan.dest_casts[i] = casts.unbounded(t)
            plan.check_types[i] = (t.base_sql, casts.unbounded(t)) if t.base_builtin else None
            lossy = not casts.lossless(s, t) and wire_info is not None
            if lossy and _lossy_allowed(spec, name):
                _note_decision(plan, name, "rounding allowed by allow_lossy_casts")
            elif lossy and (test := casts.rounding_test(name, wire_info, wire, t)) is not None:
                plan.lossy.append(LossyCast(name, s.type_sql, t.type_sql, *test))
                _note_decision(plan, name, "each value checked: one the cast would change fails the chunk")
            if not source_side:
                _note_decision(plan, name, "cast in the destination")
            continue
        if source_side:
            plan.copy_exprs[i] = (
                sql.SQL("NULL::{t}").format(t=to_t) if raw is None else sql.SQL("{r}::{t}").format(r=raw, t=to_t)
            )
            plan.check_types[i] = (t.base_sql, casts.unbounded(t))
        else:  # T (or a type inside it) is the destination's own: send text, cast in the destination
            plan.copy_exprs[i] = sql.SQL("NULL::text") if raw is None else sql.SQL("{r}::text").format(r=raw)
            plan.stage_types[i] = "text"
            plan.insert_exprs[i] = sql.SQL("{c}::{t}").format(c=col, t=to_t)
            plan.dest_casts[i] = casts.unbounded(t)
            plan.check_types[i] = None
    non_keys = [c for c in plan.columns if c not in spec.key_columns]
    if non_keys and all(c in dest_types for c in non_keys):
        plan.changed = casts.changed_predicate(non_keys, dest_types)


def _note_decision(plan: ColumnPlan, column: str, note: str) -> None:
    """Append to the column's decision (added if it had none, e.g. same type name but cast as text)."""
    prefix = f"{column}: "
    for j, d in enumerate(plan.decisions):
        if d.startswith(prefix):
            plan.decisions[j] = f"{d} ({note})"
            return
    plan.decisions.append(f"{column}: {note}")


_LENGTH_TYPES = {"character varying": "character varying", "character": "bpchar", "bit varying": "bit varying"}


def cast_type(type_sql: str) -> str:
    """The type the source query casts to: the destination type, minus a length limit.

    An explicit cast to ``varchar(n)``/``char(n)``/``varbit(n)`` silently truncates (SQL standard); without
    the limit in the cast, the destination's COPY checks the length and a too-long value fails the chunk
    instead of being cut. The wire format is the same, so binary COPY still lines up.
    """
    base, paren, _ = type_sql.partition("(")
    if paren and base in _LENGTH_TYPES and not type_sql.endswith("[]"):
        return _LENGTH_TYPES[base]
    return type_sql
