"""The tests' one spec factory: a valid backfill of ``orders`` (tests/seed.py) into ``public.orders``.

A test states only what it is about: ``make_spec(src_url, dst_url, mode="swap")``. Without connections the spec
is for tests that never connect (planning, validation rules, rendering). A module whose table differs (another
name, time column or key) builds its variant on this one, so the common keys live here once.
"""

from __future__ import annotations

from typing import Any

from airflow_backfill_provider.core.spec import BackfillSpec, load_spec
from tests.seed import ORDERS_SPEC

#: connection ids of a spec that never connects (any id without a password is valid)
NO_SOURCE, NO_DESTINATION = "src", "dst"


def spec_dict(src: str | None = None, dst: str | None = None, **over: Any) -> dict[str, Any]:
    """The spec as the dict a user writes (for tests of ``load_spec`` itself, or to change it before loading);
    ``over`` replaces top-level keys whole (``throttle={...}`` is the whole throttle section)."""
    return {
        **ORDERS_SPEC,
        "source_conn_id": src or NO_SOURCE,
        "destination_conn_id": dst or NO_DESTINATION,
        **over,
    }


def make_spec(src: str | None = None, dst: str | None = None, **over: Any) -> BackfillSpec:
    """The validated spec: the base with ``over`` applied."""
    return load_spec(spec_dict(src, dst, **over))


def spec_json(src: str | None = None, dst: str | None = None, **over: Any) -> dict[str, Any]:
    """The validated spec as operators receive it (JSON-ready, every default filled in)."""
    return make_spec(src, dst, **over).model_dump(mode="json")


def table_spec(src: str | None, dst: str | None, table: str, *, time_column: str, **over: Any) -> BackfillSpec:
    """A spec of another table, of the same name on both sides and without a version column unless ``over`` gives
    one: the tests' small tables (``ev``, ``events``, ``t``...) that are not ``orders``."""
    shape = {"name": table, "source_table": table, "destination_table": table, "time_column": time_column}
    return make_spec(src, dst, **{**shape, "version_column": None, **over})
