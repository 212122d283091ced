"""Tests of airflow_backfill_provider/live/ (see CONTRIBUTING.md, Layout)."""
