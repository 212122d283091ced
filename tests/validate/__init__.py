"""Tests of airflow_backfill_provider/validate/ (see CONTRIBUTING.md, Layout)."""
