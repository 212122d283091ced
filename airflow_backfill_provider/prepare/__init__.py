"""What a run reads and writes, from both catalogs: table shapes (catalog), casts, schema drift, what a range reads
(source), the backfill's identity, catalog facts, the live watermark (read only), the swap-mode parallel table and
its merge."""
