"""``[core] hostname_callable`` for e2e clusters: several workers on one machine, each with its own name.

A process started with E2E_WORKER_HOSTNAME (a Celery worker and the task processes it forks) reports that
name as the task instance ``hostname``; every other process reports the machine's name, as Airflow would.
"""

import os
import socket


def get_hostname() -> str:
    return os.environ.get("E2E_WORKER_HOSTNAME") or socket.getfqdn()
