"""Safe, chunked, rate-limited PostgreSQL backfills for Apache Airflow."""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Provider metadata read by Airflow's ProvidersManager (``airflow providers list``)."""
    return {
        "package-name": "airflow-backfill-provider",
        "name": "Backfill (PostgreSQL)",
        "description": "Chunked, throttled, resumable PostgreSQL backfills with newer-wins upserts and validation.",
        "versions": [__version__],
        "operators": [
            {
                "integration-name": "Backfill",
                "python-modules": [
                    "airflow_backfill_provider.operators.plan",
                    "airflow_backfill_provider.operators.chunk",
                    "airflow_backfill_provider.operators.merge",
                    "airflow_backfill_provider.operators.live",
                    "airflow_backfill_provider.operators.validate",
                ],
            }
        ],
        "triggers": [
            {
                "integration-name": "Backfill",
                "python-modules": [
                    "airflow_backfill_provider.triggers.load",
                    "airflow_backfill_provider.triggers.pacing",
                ],
            }
        ],
    }
