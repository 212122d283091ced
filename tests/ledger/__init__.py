"""Tests of airflow_backfill_provider/ledger/ (see CONTRIBUTING.md, Layout)."""
