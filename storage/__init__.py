"""Persistence: SQLAlchemy models, sessions, the job queue, the file store, migrations."""
