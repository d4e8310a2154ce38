"""output origin and verified-table specifications

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 00:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_outputs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("origin", sa.String(length=16), nullable=False, server_default="buyer"))
        batch_op.add_column(sa.Column("spec", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_outputs", schema=None) as batch_op:
        batch_op.drop_column("spec")
        batch_op.drop_column("origin")
