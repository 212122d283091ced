-- Demo source: an "orders" table with two years of history (2023-01-01 .. 2024-12-31 UTC, one order
-- every 15 minutes: 70,176 rows), the same shape as airflow_backfill_provider/demo.py (`make demo`).
-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d);
-- `docker compose down -v` throws the volume away to reseed.
-- Values are derived from the id, not random(), so every reseed gives the same table and the
-- validation numbers can be reproduced.

CREATE TABLE public.orders (
    id          bigint PRIMARY KEY,
    customer_id integer NOT NULL,
    status      text NOT NULL,
    amount      numeric(12,2) NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    note        text
);

INSERT INTO public.orders (id, customer_id, status, amount, created_at, updated_at, note)
SELECT g.n,
       (g.n * 7919) % 50000,
       (ARRAY['new', 'paid', 'shipped', 'refunded'])[1 + g.n % 4],
       round(5 + ((g.n * 104729) % 50000) / 100.0, 2),
       g.ts,
       -- updated up to three days after creation: the version column the newer-wins upsert compares
       g.ts + make_interval(hours => (g.n % 72)::int),
       CASE WHEN g.n % 10 = 0 THEN 'gift' END
FROM generate_series(timestamptz '2023-01-01 00:00:00+00',
                     timestamptz '2024-12-31 23:45:00+00',
                     interval '15 minutes') WITH ORDINALITY AS g(ts, n);

-- Chunks read `created_at >= start AND created_at < end`: without this index every chunk is a full scan.
CREATE INDEX orders_created_at_idx ON public.orders (created_at);
ANALYZE public.orders;
