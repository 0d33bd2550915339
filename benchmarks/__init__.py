"""Benchmarks: `python -m benchmarks.queue` (queue throughput, SQLite against PostgreSQL)."""
