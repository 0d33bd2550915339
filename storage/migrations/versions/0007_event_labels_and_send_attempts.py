"""job_events.label (why a series was ignored, which gate checks refused it) and
send_attempts (one row per destination per send attempt): what /metrics counts by category.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 00:30:00

Rows written before have no label (counted as "other"), and no send attempts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("label", sa.String(200), nullable=True))
    op.create_table(
        "send_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(8), nullable=False),
    )
    op.create_index("ix_send_attempts_job_id", "send_attempts", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_send_attempts_job_id", table_name="send_attempts")
    op.drop_table("send_attempts")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("label")
