"""Every broken backfill config as ONE import error, from a DAG file of its own (dags/backfill_config_check.py).

Airflow marks every DAG of a file with an import error as broken, so the DAG file that builds the good specs
(loader.register) only logs a broken entry and keeps loading the others; this module, called from a second DAG
file, raises one error naming every broken entry, so it shows in the UI and in `airflow dags list-import-errors`.
It builds the live-ingest DAG of a spec too (a build can refuse a spec that validates), which is why it is not
part of the loader: no backfill module may reach the watermark writer (tests/prepare/test_watermark_rule.py).
"""

from __future__ import annotations

import os

from airflow_backfill_provider.core.exceptions import SpecError
from airflow_backfill_provider.loader import load_backfill_dags


class ConfigErrors(SpecError):
    """Broken backfill configs, raised by the config-check DAG file so Airflow records an import error."""


def config_errors(config_dir: str | os.PathLike) -> dict[str, str]:
    """Every broken entry under ``config_dir`` (file or ``file[i]`` -> message), as the DAG files would see it.

    Builds both the backfill and the live DAG of each spec (a build can refuse a spec that validates), with
    ``auto_register=False`` so that no DAG is registered from the calling file.
    """
    from airflow_backfill_provider.factory import build_backfill_dag
    from airflow_backfill_provider.live_factory import build_live_dag

    errors: dict[str, str] = {}
    for build in (build_backfill_dag, build_live_dag):
        result = load_backfill_dags(
            config_dir, strict=False, build=lambda spec, build=build: build(spec, auto_register=False)
        )
        for where, message in result.errors.items():
            errors.setdefault(where, message)
    return errors


def raise_config_errors(config_dir: str | os.PathLike) -> None:
    """Raise :class:`ConfigErrors` naming every broken entry under ``config_dir``; return if there is none.

    Call it from a DAG file of its own (``dags/backfill_config_check.py``): Airflow then shows one import
    error for that file (UI, ``airflow dags list-import-errors``), while the DAG file that builds the good
    specs keeps loading them.
    """
    errors = config_errors(config_dir)
    if not errors:
        return
    raise ConfigErrors(
        f"{len(errors)} backfill config entr{'y is' if len(errors) == 1 else 'ies are'} broken in {config_dir}; "
        "their DAGs are not loaded (the other configs' DAGs are). Fix the key named below in the YAML file; "
        "this error clears on the next parse.\n\n" + "\n\n".join(errors[where] for where in sorted(errors))
    )
