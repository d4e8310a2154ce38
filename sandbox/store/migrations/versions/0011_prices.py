"""prices: a contract's price list

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 09:00:00.000000

A contract may carry a price list (issue 14): a flat fee per month and prices per CPU-hour, GPU-hour,
unit of epsilon and released gigabyte, kept as decimal strings (`sandbox.billing.prices.PriceList`).
Invoices apply it to the contract's audited usage. Contracts from before price nothing (`{}`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN, not a batch: on SQLite a batch copies the table and drops the old one, which other
    # tables' foreign keys to contracts refuse once rows exist.
    op.add_column("contracts", sa.Column("prices", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    with op.batch_alter_table("contracts") as batch:
        batch.drop_column("prices")
