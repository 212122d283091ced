"""The vocabulary every stage shares: the spec, chunks and the rule for their SQL bounds, every SQL text, the
provider tables' DDL, exception types, transient vs permanent errors, interrupts, client-side deadlines, DSNs, and
the only module that checks Airflow's version (compat)."""
