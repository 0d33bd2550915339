"""jobs.rule_name and jobs.destinations: which rule decided a job and where it sends

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 13:00:00

Jobs made before rules existed keep NULL in both: they go to every destination that is not a
shadow, as they did.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("rule_name", sa.String(64), nullable=True))
        batch.add_column(sa.Column("destinations", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("destinations")
        batch.drop_column("rule_name")
