"""series.description, number and date: series named as people look them up

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 10:00:00

Read from the first instance received (SeriesDescription, SeriesNumber, SeriesDate, else
StudyDate); no patient attribute. Series received before keep NULL and are named by UID.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("description", sa.String(64), nullable=True))
        batch.add_column(sa.Column("series_number", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("series_date", sa.String(8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        for column in ("series_date", "series_number", "description"):
            batch.drop_column(column)
