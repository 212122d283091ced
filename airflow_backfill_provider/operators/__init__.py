"""Operators: thin Airflow wrappers around the pure modules (plan, transfer, validate)."""
