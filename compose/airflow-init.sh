#!/usr/bin/env bash
# One-shot init of the demo stack (service airflow-init in docker-compose.yaml), run as root like the
# init step of the official Airflow compose file: migrate the metadata DB and create the admin user,
# check the provider is in the image, create the source pool, hand the shared folders to AIRFLOW_UID.
set -euo pipefail

if [[ -z "${AIRFLOW_UID:-}" ]]; then
  echo "WARNING: AIRFLOW_UID is not set; ./logs, ./dags, ./config, ./plugins will be owned by uid 50000."
  echo "On Linux run once:  echo \"AIRFLOW_UID=\$(id -u)\" > .env"
  AIRFLOW_UID=50000
fi

mkdir -v -p /opt/airflow/{logs,dags,plugins,config}

# /entrypoint runs `airflow db migrate` and creates the admin user first (_AIRFLOW_DB_MIGRATE,
# _AIRFLOW_WWW_USER_CREATE in the service environment), then runs the command.
/entrypoint airflow version
# Writes config/airflow.cfg if missing (AIRFLOW_CONFIG points there), as the official init does.
/entrypoint airflow config list >/dev/null

# Later calls skip the migration and user creation already done above.
af() { _AIRFLOW_DB_MIGRATE=false _AIRFLOW_WWW_USER_CREATE=false /entrypoint airflow "$@"; }

# Fail here, at `docker compose up`, rather than at the first chunk, if the image lacks the provider.
af providers get airflow-backfill-provider

# The pool is the cap on concurrent chunks against the source database. --include-deferred makes a
# chunk that waits for the source's load to drop keep its slot, so the pool also bounds how many
# chunks poll the source (see docs/running-at-scale.md). `pools set` overwrites: reruns are safe.
af pools set "${BACKFILL_SOURCE_POOL:-backfill_source}" "${BACKFILL_SOURCE_POOL_SLOTS:-4}" \
  "Concurrent backfill chunks reading the source PostgreSQL (source-db)" --include-deferred

chown -R "${AIRFLOW_UID}:0" /opt/airflow/
chown -v -R "${AIRFLOW_UID}:0" /opt/airflow/{logs,dags,plugins,config}
echo "airflow-init done"
