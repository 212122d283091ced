"""Tests of airflow_backfill_provider/core/ (see CONTRIBUTING.md, Layout)."""
