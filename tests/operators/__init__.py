"""Tests of airflow_backfill_provider/operators/ (see CONTRIBUTING.md, Layout)."""
