"""Connection ids versus libpq DSNs/URLs, and why a DSN with a password is refused.

A conn id ends up in the serialized DAG, the rendered task fields and the trigger rows of the metadata
database. A libpq URL without a password is harmless there (tests and scripts use them); one with a
password would leak the secret to anyone who can read the DAG or the metadata DB.
"""

from __future__ import annotations


def is_dsn(value: str) -> bool:
    """A libpq URI (``postgresql://...``) or key=value string rather than an Airflow connection id."""
    return "://" in value or "=" in value


def dsn_has_password(value: str) -> bool:
    """True if ``value`` is a DSN that carries a password (or cannot be parsed, so might)."""
    if not is_dsn(value):
        return False
    from psycopg2.extensions import parse_dsn  # libpq's own parser: URIs, key=value, ?password=

    try:
        return bool(parse_dsn(value).get("password"))
    except Exception:  # noqa: BLE001 - unparsable: treat as unsafe to store
        return True


def password_dsn_message(key: str) -> str:
    return (
        f"{key} is a connection URL with a password: it would be stored in the serialized DAG and the "
        "metadata database. Create an Airflow connection (Admin -> Connections, "
        "`airflow connections add`, or an AIRFLOW_CONN_<ID> environment variable or secrets backend) "
        f"and set {key} to its id; a URL without a password is accepted"
    )
