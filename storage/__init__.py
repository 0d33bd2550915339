"""Persistence: SQLAlchemy models, sessions, the job queue, the file store, migrations; the DICOM
image code (stored series <-> volumes) in storage/images/."""
