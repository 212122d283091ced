"""Tests of airflow_backfill_provider/ui/ (see CONTRIBUTING.md, Layout)."""
