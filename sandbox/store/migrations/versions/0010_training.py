"""training: a job's training spec, encoding plan, budget reservation and progress

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 07:00:00.000000

`training` and `dp_training` jobs (issue 13) keep what the platform needs to run and settle them:
the spec the buyer sent, the encoding fixed from the card, the id of the epsilon reservation a DP
run holds on the contract's ledger, and the trainer's last reported step. Other jobs leave it NULL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("training", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("training")
