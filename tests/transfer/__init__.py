"""Tests of airflow_backfill_provider/transfer/ (see CONTRIBUTING.md, Layout)."""
