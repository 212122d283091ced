"""When a chunk may read the source: load probe, go/wait/critical, pacing and the read watch (probe); the server-wide
latency signal; maintenance windows; VACUUM/ANALYZE waits."""
