# Airflow image with this repository's provider installed, for docker-compose.yaml.
#   docker compose build        (or: docker build -t airflow-backfill-provider:local .)
FROM apache/airflow:3.3.2-python3.11

# The build context is the repository root; .dockerignore keeps only what `pip install` needs
# (pyproject.toml, README.md, the package), so editing DAGs or tests does not rebuild this layer.
COPY --chown=airflow:0 . /opt/airflow/src/airflow-backfill-provider

USER airflow
# Pin Airflow to the image's version so resolving the provider's dependencies cannot up- or downgrade it
# (the official "extend the image" recipe). AIRFLOW_VERSION is set by the base image.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/airflow/src/airflow-backfill-provider
