"""Tests of airflow_backfill_provider/plan/ (see CONTRIBUTING.md, Layout)."""
