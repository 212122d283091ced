"""One chunk: source COPY -> pipe -> staging -> newer-wins upsert -> ledger row in one transaction (chunk), first
load straight in, cast and encoding diagnostics."""
