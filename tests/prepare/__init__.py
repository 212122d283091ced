"""Tests of airflow_backfill_provider/prepare/ (see CONTRIBUTING.md, Layout)."""
