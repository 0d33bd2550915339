"""jobs.progress_*: how far the stage in hand is (slices denoised, instances sent)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 09:00:00

The worker writes these at a bounded rate while it denoises or sends; they are cleared when a
stage is claimed. Older jobs keep NULL: no progress to show.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("progress_stage", sa.String(16), nullable=True))
        batch.add_column(sa.Column("progress_done", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("progress_total", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("progress_started_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("progress_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in ("progress_at", "progress_started_at", "progress_total", "progress_done",
                       "progress_stage"):
            batch.drop_column(column)
