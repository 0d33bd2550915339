"""instances.size_bytes as a 64-bit integer on PostgreSQL

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 11:15:00

node.max_instance_mb allows 2 GiB and more; PostgreSQL's INTEGER stops one byte short of
2 GiB. SQLite's INTEGER is 64-bit already, so its table is left as it is (no copy).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("instances", "size_bytes", type_=sa.BigInteger(),
                        existing_type=sa.Integer(), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("instances", "size_bytes", type_=sa.Integer(),
                        existing_type=sa.BigInteger(), existing_nullable=False)
