"""Backfill DAGs built from the YAML files in ./configs (one DAG per spec).

Parse-time cheap: reads YAML and builds DAG objects; no database or network access here.
Set AIRFLOW_BACKFILL_STRICT=1 to turn a bad config into an import error (for CI).
"""

from pathlib import Path

from airflow_backfill_provider.loader import register

register(Path(__file__).parent / "configs", globals())
