"""series.received_via: how a series came when not over DIMSE ("STOW-RS, user NAME")

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 03:00:00

Series received over DIMSE keep NULL (their source is calling_ae_title), those before too.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("received_via", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("received_via")
