-- The role Airflow uses for the source (AIRFLOW_CONN_BACKFILL_SOURCE_PG): it can read the table and
-- nothing else. pg_monitor lets the load probe see other sessions' state in pg_stat_activity
-- (without it, other users' rows show state NULL and the probe would see an idle database).
CREATE ROLE backfill_reader LOGIN PASSWORD 'backfill_reader';
GRANT CONNECT ON DATABASE shop TO backfill_reader;
GRANT USAGE ON SCHEMA public TO backfill_reader;
GRANT SELECT ON public.orders TO backfill_reader;
GRANT pg_monitor TO backfill_reader;
