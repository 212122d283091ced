"""The package registers as an Airflow provider (entry point apache_airflow_provider)."""

import json
import subprocess
import sys
from pathlib import Path

import importlib.metadata

import pytest

from airflow_backfill_provider import get_provider_info


def _installed() -> bool:
    try:
        importlib.metadata.distribution("airflow-backfill-provider")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_provider_info_is_complete():
    info = get_provider_info()
    assert info["package-name"] == "airflow-backfill-provider"
    assert info["versions"] and info["name"]


@pytest.mark.skipif(not _installed(), reason="package not pip-installed in this environment (make test installs it)")
def test_airflow_providers_list_shows_the_package():
    airflow = Path(sys.executable).with_name("airflow")
    out = subprocess.run([str(airflow), "providers", "list", "-o", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    names = [p["package_name"] for p in json.loads(out.stdout[out.stdout.index("[") :])]
    assert "airflow-backfill-provider" in names
