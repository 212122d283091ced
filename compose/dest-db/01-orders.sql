-- Demo destination: the same orders table, empty. The destination schema is the truth the backfill
-- maps source columns onto; the key (id) is the primary key the newer-wins upsert conflicts on.
-- The provider creates its own ledger and validation tables here.

CREATE TABLE public.orders (
    id          bigint PRIMARY KEY,
    customer_id integer NOT NULL,
    status      text NOT NULL,
    amount      numeric(12,2) NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    note        text
);
CREATE INDEX orders_created_at_idx ON public.orders (created_at);
