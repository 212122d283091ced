"""Triggers that let chunks wait without holding a worker slot."""
