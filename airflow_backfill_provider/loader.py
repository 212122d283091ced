"""Load backfill DAGs from YAML files (``yaml.safe_load``), dag-factory style.

One broken entry does not break the others: it is logged (and kept in ``LoadResult.errors``) and the
rest are built. Strict mode (``strict=True`` or env ``AIRFLOW_BACKFILL_STRICT=1``, for CI) raises on
the first problem instead, so a bad config fails the build.

A broken entry shows as an import error through a second DAG file that defines no DAG and only calls
``configcheck.raise_config_errors``. It has to be a file of its own: on Airflow 3.3 and 2.11 an import error of a
file marks every DAG of that file as having import errors (3.3 also marks them stale), so the scheduler
stops creating their runs; an error raised in the file that builds the good DAGs would take them down too.

A file holds either one spec (a mapping with ``name``) or ``backfills: [spec, ...]``; a top-level
``defaults:`` mapping is merged under every entry of that file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from airflow_backfill_provider.core.exceptions import SpecError

log = logging.getLogger(__name__)


@dataclass
class LoadResult:
    dags: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _entries(path: Path) -> list[tuple[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise SpecError(f"{path.name}: expected a mapping (one spec, or 'backfills: [...]'), got {type(doc).__name__}")
    if "backfills" in doc:
        defaults = doc.get("defaults") or {}
        items = doc["backfills"]
        if not isinstance(items, list):
            raise SpecError(f"{path.name}: 'backfills' must be a list of specs")
        return [
            (f"{path.name}[{i}]", {**defaults, **item} if isinstance(item, dict) else item)
            for i, item in enumerate(items)
        ]
    return [(path.name, doc)]


def load_backfill_dags(config_dir: str | os.PathLike, *, strict: bool | None = None, build=None) -> LoadResult:
    """Build a DAG for every spec in ``*.yaml``/``*.yml`` under ``config_dir``.

    ``build(spec)`` makes the DAG (default: the backfill DAG); it may return None to skip a spec
    (the live-ingest loader skips specs without ``live.enabled``).
    """
    from airflow_backfill_provider.core.spec import load_spec

    if build is None:
        from airflow_backfill_provider.factory import build_backfill_dag as build

    if strict is None:
        strict = os.environ.get("AIRFLOW_BACKFILL_STRICT", "").lower() in ("1", "true", "yes")
    result = LoadResult()
    for path in sorted([*Path(config_dir).glob("*.yaml"), *Path(config_dir).glob("*.yml")]):
        try:
            entries = _entries(path)
        except (yaml.YAMLError, SpecError, OSError) as err:
            _fail(result, path.name, f"{path.name}: {err}", strict)
            continue
        for where, data in entries:
            try:
                spec = load_spec(data, where=where)
                dag = build(spec)
                if dag is None:
                    continue
                if dag.dag_id in result.dags:
                    raise SpecError(f"{where}: dag_id {dag.dag_id!r} is defined twice; give each a unique name")
                result.dags[dag.dag_id] = dag
            except Exception as err:  # noqa: BLE001 - one bad entry must not break the others
                _fail(result, where, str(err), strict)
    return result


def _fail(result: LoadResult, where: str, message: str, strict: bool) -> None:
    if strict:
        raise SpecError(message)
    result.errors[where] = message
    log.error("Backfill config %s skipped: %s", where, message)


def register(
    config_dir: str | os.PathLike, namespace: dict[str, Any], *, strict: bool | None = None, build=None
) -> LoadResult:
    """Load and put each DAG into ``namespace`` (a DAG file's ``globals()``) so Airflow finds it."""
    result = load_backfill_dags(config_dir, strict=strict, build=build)
    namespace.update(result.dags)
    return result
