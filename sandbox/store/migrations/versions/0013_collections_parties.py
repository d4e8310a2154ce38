"""collections and several hospitals: dataset kinds, by-reference versions, contract parties, job datasets and approvals

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 19:00:00.000000

Issue 17. A dataset is a table or a file collection (`kind`); a collection's version is registered in place,
and `reference` is the folder it was read from (its manifest is the Parquet at `path`). A contract may name
datasets of several data-holder orgs: each is a party (`contract_parties`) that must consent before the
contract is usable, and may name its own policy. A job may read several datasets (`jobs.datasets`), and each
org whose data it reads approves it (`job_approvals`). Existing contracts get their owner as the one party,
consented when the contract was made; existing jobs read their one dataset.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("datasets", sa.Column("kind", sa.String(8), nullable=False, server_default=sa.text("'table'")))
    op.add_column("dataset_versions", sa.Column("reference", sa.String(1000), nullable=True))
    op.add_column("jobs", sa.Column("datasets", sa.JSON(), nullable=True))
    op.create_table(
        "contract_parties",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("contract_id", sa.String(40), sa.ForeignKey("contracts.id"), nullable=False, index=True),
        sa.Column("org", sa.String(64), nullable=False, index=True),
        sa.Column("policy_name", sa.String(64), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("consented_by", sa.String(200), nullable=True),
        sa.Column("consented_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("contract_id", "org"),
    )
    op.create_table(
        "job_approvals",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("steward", sa.String(200), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("job_id", "org"),
    )
    op.execute(
        "INSERT INTO contract_parties (contract_id, org, policy_name, policy_version, consented_by, consented_at) "
        "SELECT id, owner_org, policy_name, policy_version, created_by, created_at FROM contracts"
    )


def downgrade() -> None:
    op.drop_table("job_approvals")
    op.drop_table("contract_parties")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("datasets")
    with op.batch_alter_table("dataset_versions") as batch:
        batch.drop_column("reference")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("kind")
