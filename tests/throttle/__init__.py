"""Tests of airflow_backfill_provider/throttle/ (see CONTRIBUTING.md, Layout)."""
