"""exact budget arithmetic: integer epsilon and delta units, reservation holders

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 01:00:00.000000

Review 11.4: float sums with a slack let 50 queries at epsilon 1e-9 through an exhausted budget. The
ledger now computes in integers (micro-epsilon, 1e-12 delta); existing float figures are backfilled,
totals rounded down and spend rounded up, so the backfill never grants budget.
"""

from __future__ import annotations

import math

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

EPSILON_SCALE = 1_000_000
DELTA_SCALE = 1_000_000_000_000


def _down(value: float | None, scale: int) -> int | None:
    """Round a total down: the backfill never grants budget."""
    return None if value is None else math.floor(value * scale + 1e-6)


def _up(value: float | None, scale: int) -> int:
    """Round spend up: the backfill never forgets spend."""
    return 0 if value is None else max(0, math.ceil(value * scale - 1e-6))


def _units(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=nullable, server_default=None if nullable else "0")


def upgrade() -> None:
    with op.batch_alter_table("budget_ledgers", schema=None) as batch_op:
        for name in ("epsilon_total_units", "epsilon_spent_units", "epsilon_reserved_units",
                     "delta_total_units", "delta_spent_units", "delta_reserved_units"):
            batch_op.add_column(_units(name))
    with op.batch_alter_table("dataset_budgets", schema=None) as batch_op:
        batch_op.add_column(_units("epsilon_cap_units", nullable=True))
        for name in ("epsilon_spent_units", "epsilon_reserved_units", "mock_epsilon_units"):
            batch_op.add_column(_units(name))
    with op.batch_alter_table("budget_reservations", schema=None) as batch_op:
        batch_op.add_column(_units("epsilon_units"))
        batch_op.add_column(_units("delta_units"))
        batch_op.add_column(sa.Column("holder", sa.String(length=64), nullable=False, server_default=""))
    e, d = EPSILON_SCALE, DELTA_SCALE
    bind = op.get_bind()
    for row in bind.execute(sa.text("SELECT id, epsilon_total, epsilon_spent, epsilon_reserved, delta_total, "
                                    "delta_spent, delta_reserved FROM budget_ledgers")).all():
        bind.execute(sa.text(
            "UPDATE budget_ledgers SET epsilon_total_units = :et, epsilon_spent_units = :es, "
            "epsilon_reserved_units = :er, delta_total_units = :dt, delta_spent_units = :ds, "
            "delta_reserved_units = :dr WHERE id = :id"),
            {"id": row[0], "et": _down(row[1], e), "es": _up(row[2], e), "er": _up(row[3], e),
             "dt": _down(row[4], d), "ds": _up(row[5], d), "dr": _up(row[6], d)})
    for row in bind.execute(sa.text("SELECT dataset, epsilon_cap, epsilon_spent, epsilon_reserved, mock_epsilon "
                                    "FROM dataset_budgets")).all():
        bind.execute(sa.text(
            "UPDATE dataset_budgets SET epsilon_cap_units = :cap, epsilon_spent_units = :es, "
            "epsilon_reserved_units = :er, mock_epsilon_units = :me WHERE dataset = :dataset"),
            {"dataset": row[0], "cap": _down(row[1], e), "es": _up(row[2], e), "er": _up(row[3], e),
             "me": _up(row[4], e)})
    for row in bind.execute(sa.text("SELECT id, epsilon, delta FROM budget_reservations")).all():
        bind.execute(sa.text("UPDATE budget_reservations SET epsilon_units = :eu, delta_units = :du WHERE id = :id"),
                     {"id": row[0], "eu": _up(row[1], e), "du": _up(row[2], d)})


def downgrade() -> None:
    with op.batch_alter_table("budget_reservations", schema=None) as batch_op:
        for name in ("holder", "delta_units", "epsilon_units"):
            batch_op.drop_column(name)
    with op.batch_alter_table("dataset_budgets", schema=None) as batch_op:
        for name in ("mock_epsilon_units", "epsilon_reserved_units", "epsilon_spent_units", "epsilon_cap_units"):
            batch_op.drop_column(name)
    with op.batch_alter_table("budget_ledgers", schema=None) as batch_op:
        for name in ("delta_reserved_units", "delta_spent_units", "delta_total_units",
                     "epsilon_reserved_units", "epsilon_spent_units", "epsilon_total_units"):
            batch_op.drop_column(name)
