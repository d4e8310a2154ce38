"""per-steward output reviews

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 22:48:00.503646
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "output_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("output_id", sa.Integer(), nullable=False),
        sa.Column("steward", sa.String(length=200), nullable=False),
        sa.Column("org", sa.String(length=64), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["output_id"],
            ["job_outputs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("output_reviews", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_output_reviews_output_id"), ["output_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("output_reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_output_reviews_output_id"))

    op.drop_table("output_reviews")
