"""job_events.kind: what each audit row records, so that nothing parses the reason text

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 09:00:00

Rows written before have their kind filled in from their states and, where the states alone
do not tell (a superseded job, a released lease), from the reason text that this release's
predecessors wrote. The values are storage.queue.EventKind's, written out here so that this
migration keeps meaning what it meant when the enum changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Reasons older releases wrote when a job went back to the start of its stage without a
# failed attempt: an expired lease, a dead worker found at start, a stopped worker.
_RELEASED = ("reason LIKE 'lease of % expired' OR reason LIKE 'worker % is gone%' "
             "OR reason LIKE 'worker stopped%'")

# First match wins (a CASE over from_state, to_state and reason).
_BACKFILL = f"""
UPDATE job_events SET kind = CASE
    WHEN from_state IS NULL THEN 'created'
    WHEN from_state = to_state THEN 'note'
    WHEN to_state = 'failed' THEN 'failed'
    WHEN to_state = 'done' THEN 'sent'
    WHEN to_state = 'held' THEN 'held'
    WHEN to_state IN ('processing', 'sending') THEN 'started'
    WHEN to_state = 'processed' AND from_state = 'processing' THEN 'denoised'
    WHEN to_state = 'processed' AND from_state = 'held' THEN 'approved'
    WHEN to_state = 'processed' AND ({_RELEASED}) THEN 'released'
    WHEN to_state = 'processed' THEN 'retry'
    WHEN to_state = 'ignored' AND reason LIKE 'superseded by job%' THEN 'superseded'
    WHEN to_state = 'ignored' AND from_state = 'held' THEN 'rejected'
    WHEN to_state = 'ignored' THEN 'ignored'
    WHEN to_state = 'queued' AND from_state IN ('processing', 'sending') AND ({_RELEASED})
        THEN 'released'
    WHEN to_state = 'queued' AND from_state = 'processing' THEN 'retry'
    WHEN to_state = 'queued' AND from_state = 'sending' THEN 'requeued'
    ELSE 'replayed'
END
"""


def upgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=True))
    op.execute(_BACKFILL)
    with op.batch_alter_table("job_events") as batch:
        batch.alter_column("kind", existing_type=sa.String(16), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("kind")
