"""dp budgets, answers and mocks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 22:18:07.650046
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "dataset_budgets",
        sa.Column("dataset", sa.String(length=64), nullable=False),
        sa.Column("epsilon_cap", sa.Float(), nullable=True),
        sa.Column("epsilon_spent", sa.Float(), nullable=False),
        sa.Column("epsilon_reserved", sa.Float(), nullable=False),
        sa.Column("mock_epsilon", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("dataset"),
    )
    op.create_table(
        "budget_ledgers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("contract_id", sa.String(length=40), nullable=False),
        sa.Column("dataset", sa.String(length=64), nullable=False),
        sa.Column("epsilon_total", sa.Float(), nullable=False),
        sa.Column("epsilon_spent", sa.Float(), nullable=False),
        sa.Column("epsilon_reserved", sa.Float(), nullable=False),
        sa.Column("delta_total", sa.Float(), nullable=False),
        sa.Column("delta_spent", sa.Float(), nullable=False),
        sa.Column("delta_reserved", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["contract_id"],
            ["contracts.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("contract_id", "dataset"),
    )
    with op.batch_alter_table("budget_ledgers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_budget_ledgers_contract_id"), ["contract_id"], unique=False)

    op.create_table(
        "dp_answers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("contract_id", sa.String(length=40), nullable=False),
        sa.Column("cache_key", sa.String(length=64), nullable=False),
        sa.Column("dataset", sa.String(length=64), nullable=False),
        sa.Column("dataset_version", sa.Integer(), nullable=False),
        sa.Column("sql", sa.Text(), nullable=False),
        sa.Column("answer", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["contract_id"],
            ["contracts.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("contract_id", "cache_key"),
    )
    with op.batch_alter_table("dp_answers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dp_answers_contract_id"), ["contract_id"], unique=False)

    op.create_table(
        "budget_reservations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("ledger_id", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("query_key", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["ledger_id"],
            ["budget_ledgers.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("budget_reservations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_budget_reservations_ledger_id"), ["ledger_id"], unique=False)

    op.create_table(
        "dataset_mocks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_version_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_version_id"],
            ["dataset_versions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dataset_version_id"),
    )
    _backfill()


def _backfill() -> None:
    """Budgets for datasets and contracts made before this migration."""
    connection = op.get_bind()
    datasets = connection.execute(sa.text("SELECT name FROM datasets")).scalars().all()
    for name in datasets:
        connection.execute(
            sa.text(
                "INSERT INTO dataset_budgets (dataset, epsilon_cap, epsilon_spent, epsilon_reserved, mock_epsilon) "
                "VALUES (:name, NULL, 0, 0, 0)"
            ),
            {"name": name},
        )
    for contract_id, names, epsilon, delta in connection.execute(
        sa.text("SELECT id, datasets, epsilon, delta FROM contracts")
    ).all():
        for name in json.loads(names) if isinstance(names, str) else names:
            connection.execute(
                sa.text(
                    "INSERT INTO budget_ledgers (contract_id, dataset, epsilon_total, epsilon_spent, epsilon_reserved, "
                    "delta_total, delta_spent, delta_reserved) VALUES (:c, :d, :e, 0, 0, :dl, 0, 0)"
                ),
                {"c": contract_id, "d": name, "e": epsilon, "dl": delta},
            )


def downgrade() -> None:

    op.drop_table("dataset_mocks")
    with op.batch_alter_table("budget_reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budget_reservations_ledger_id"))

    op.drop_table("budget_reservations")
    with op.batch_alter_table("dp_answers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dp_answers_contract_id"))

    op.drop_table("dp_answers")
    with op.batch_alter_table("budget_ledgers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budget_ledgers_contract_id"))

    op.drop_table("budget_ledgers")
    op.drop_table("dataset_budgets")
