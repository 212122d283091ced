"""Backfill DAGs built from the YAML files in ./configs (one DAG per spec).

Parse-time cheap: reads YAML and builds DAG objects; no database or network access here.
A bad config is skipped here and shown as an import error of backfill_config_check.py; set
AIRFLOW_BACKFILL_STRICT=1 to make it an import error of this file instead (for CI; stops every DAG here).
"""

from pathlib import Path

from airflow_backfill_provider.loader import register

register(Path(__file__).parent / "configs", globals())
