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


def test_a_deferred_chunks_trigger_can_be_stored(monkeypatch):
    """Deferral stores the trigger's kwargs encrypted (Fernet): the installed Airflow and cryptography must agree
    (2.11 with cryptography 51 failed every deferral, and the chunk hung as running under `dags backfill`)."""
    from airflow.models import crypto
    from cryptography.fernet import Fernet

    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
    monkeypatch.setattr(crypto, "_fernet", None, raising=False)  # get_fernet() caches the one it built
    get_fernet = getattr(crypto.get_fernet, "__wrapped__", crypto.get_fernet)  # 3.x caches with lru_cache

    from airflow_backfill_provider.triggers.load import SourceLoadTrigger

    classpath, kwargs = SourceLoadTrigger(**_trigger_kwargs()).serialize()
    fernet = get_fernet()
    token = fernet.encrypt(json.dumps({"classpath": classpath, "kwargs": kwargs}, default=str).encode())
    assert json.loads(fernet.decrypt(token))["classpath"] == classpath


def _trigger_kwargs() -> dict:
    from airflow_backfill_provider.core.spec import ThrottleSpec

    return {"conn_id": "backfill_source_pg", "throttle": ThrottleSpec().model_dump(mode="json"), "started_at": 0.0}
