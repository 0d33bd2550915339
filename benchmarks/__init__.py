"""Benchmarks: `python -m benchmarks` (receive, send, inference, end to end) and
`python -m benchmarks.queue` (queue throughput, SQLite against PostgreSQL)."""
