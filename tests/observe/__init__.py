"""Tests of airflow_backfill_provider/observe/ (see CONTRIBUTING.md, Layout)."""
