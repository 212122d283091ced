-- Demo destination: the same orders table, empty. The destination schema is the truth the backfill
-- maps source columns onto. The provider creates its own ledger and validation tables here.

CREATE TABLE public.orders (
    order_id    bigint        PRIMARY KEY,
    customer_id integer       NOT NULL,
    status      text          NOT NULL,
    amount      numeric(12,2) NOT NULL,
    currency    char(3)       NOT NULL,
    created_at  timestamptz   NOT NULL,
    updated_at  timestamptz   NOT NULL
);
CREATE INDEX orders_created_at_idx ON public.orders (created_at);
