-- Demo source: an "orders" table with two years of history (2023-01-01 .. 2024-12-31 UTC, one order
-- every 15 minutes: 70,176 rows). Run once by the postgres image on an empty data volume
-- (/docker-entrypoint-initdb.d); `docker compose down -v` throws the volume away to reseed.
-- Values are derived from order_id, not random(), so every reseed gives the same table and the
-- validation numbers in the docs can be reproduced.

CREATE TABLE public.orders (
    order_id    bigint        PRIMARY KEY,
    customer_id integer       NOT NULL,
    status      text          NOT NULL,
    amount      numeric(12,2) NOT NULL,
    currency    char(3)       NOT NULL,
    created_at  timestamptz   NOT NULL,
    updated_at  timestamptz   NOT NULL
);

INSERT INTO public.orders (order_id, customer_id, status, amount, currency, created_at, updated_at)
SELECT g.n,
       1 + (g.n * 7919) % 5000,
       CASE WHEN g.n % 20 = 0 THEN 'cancelled'
            WHEN g.n % 7 = 0 THEN 'refunded'
            ELSE 'delivered' END,
       round(5 + ((g.n * 104729) % 50000) / 100.0, 2),
       (ARRAY['EUR', 'USD', 'GBP'])[1 + g.n % 3],
       g.ts,
       -- updated up to three days after creation: the version column the newer-wins upsert compares
       g.ts + make_interval(hours => (g.n % 72)::int)
FROM generate_series(timestamptz '2023-01-01 00:00:00+00',
                     timestamptz '2024-12-31 23:45:00+00',
                     interval '15 minutes') WITH ORDINALITY AS g(ts, n);

-- Chunks read `created_at >= start AND created_at < end`: without this index every chunk is a full scan.
CREATE INDEX orders_created_at_idx ON public.orders (created_at);
ANALYZE public.orders;
