"""workers: each worker publishes what its machine gives jobs (CPUs, memory, GPUs)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 10:00:00.000000

Issue 13: a GPU job that no worker could run waited in the queue forever. Each worker now publishes
itself at start and on its image-refresh cadence; submission refuses a GPU job that no worker seen in
the last few minutes could run, and stewards see the workers' GPUs in `/healthz`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("gpu_names", sa.JSON(), nullable=False),
        sa.Column("cpus", sa.Float(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("workers")
