"""registration: each version's status, de-identification report, difference, signature and provenance

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 16:00:00.000000

Every new version is checked before use (issue 16): direct identifiers and k-anonymity decide whether it
is `active` or `blocked` (held in quarantine for a steward's remediation or signed override), and a blocked
version that a later one replaced becomes `superseded`. Versions from before were registered unchecked and
stay `active`. The report, the difference from the previous version, the publishing org's signature and the
provenance (transforms, the commitment's nonce, overrides) are kept with the version.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (no batch copy): other tables' foreign keys point at dataset_versions' parent.
    op.add_column("dataset_versions", sa.Column("status", sa.String(16), nullable=False,
                                                server_default=sa.text("'active'")))
    op.add_column("dataset_versions", sa.Column("deid", sa.JSON(), nullable=True))
    op.add_column("dataset_versions", sa.Column("diff", sa.JSON(), nullable=True))
    op.add_column("dataset_versions", sa.Column("signature", sa.JSON(), nullable=True))
    op.add_column("dataset_versions", sa.Column("provenance", sa.JSON(), nullable=False,
                                                server_default=sa.text("'{}'")))


def downgrade() -> None:
    with op.batch_alter_table("dataset_versions") as batch:
        for column in ("provenance", "signature", "diff", "deid", "status"):
            batch.drop_column(column)
