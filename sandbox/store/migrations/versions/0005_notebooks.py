"""notebook session tokens

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 01:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notebook_tokens",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("jti", sa.String(length=200), nullable=False),
        sa.Column("sub", sa.String(length=200), nullable=False),
        sa.Column("org", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    with op.batch_alter_table("notebook_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_notebook_tokens_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("notebook_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notebook_tokens_job_id"))
    op.drop_table("notebook_tokens")
