"""Shows every broken backfill config in ./configs as an import error of this file (UI and
`airflow dags list-import-errors`). Defines no DAG (no airflow DAG object is built here).

A file of its own on purpose: Airflow marks every DAG of a file with an import error as broken, so raising in
backfill_dags.py would stop the good DAGs too (see airflow_backfill_provider/loader.py).
"""

from pathlib import Path

from airflow_backfill_provider.configcheck import raise_config_errors

raise_config_errors(Path(__file__).parent / "configs")
