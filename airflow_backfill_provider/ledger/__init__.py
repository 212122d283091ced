"""The ledger table (one row per committed chunk) and the coverage of its ranges."""
