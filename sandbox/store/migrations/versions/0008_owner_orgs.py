"""owner orgs: datasets, contracts and policy versions belong to a data-holder org

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 02:00:00.000000

Review 11.10: a steward was bound to no org, so a steward of a buyer's own org, or of another
hospital, approved jobs, wrote contracts and decided policies on data that was not theirs. Each
object now names its owner org, and only that org's stewards act on it.

Backfill, best evidence first:
- datasets: the org of the `dataset.create` audit event; else the org of the tokens this instance
  issued to the creating steward (`created_by`), when they all name one org;
- contracts: the org of the `contract.create` audit event; else the owner of the datasets it names,
  when they share one; else the creating steward's tokens as above;
- policy versions: shipped ones (created by `system`) stay global (NULL); a steward's proposal
  takes the org of its `policy.propose` event, else the creator's tokens.
What none of these settles gets `?unknown`, an owner no token can name (org claims must match the
org pattern), so the object fails closed: no steward acts on it until an operator sets its owner.
"""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UNKNOWN_OWNER = "?unknown"  # sandbox.auth.orgs.UNKNOWN_OWNER, copied: migrations do not import the app


def _event_orgs(bind: sa.Connection, action: str) -> dict[str, str]:
    """object_id -> org of the first `action` event by a person (system events have org '-')."""
    found: dict[str, str] = {}
    rows = bind.execute(sa.text("SELECT object_id, org FROM audit_events WHERE action = :action AND org <> '-' "
                                "ORDER BY seq"), {"action": action}).all()
    for object_id, org in rows:
        found.setdefault(str(object_id), str(org))
    return found


def _steward_orgs(bind: sa.Connection) -> dict[str, str]:
    """sub -> org, for stewards whose issued tokens all name one org."""
    orgs: dict[str, set[str]] = defaultdict(set)
    for sub, org in bind.execute(sa.text("SELECT sub, org FROM issued_tokens WHERE role = 'steward'")).all():
        orgs[str(sub)].add(str(org))
    return {sub: next(iter(names)) for sub, names in orgs.items() if len(names) == 1}


def upgrade() -> None:
    for table in ("datasets", "contracts"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("owner_org", sa.String(length=64), nullable=False,
                                          server_default=UNKNOWN_OWNER))
            batch_op.create_index(f"ix_{table}_owner_org", ["owner_org"], unique=False)
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_org", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_policies_owner_org", ["owner_org"], unique=False)

    bind = op.get_bind()
    stewards = _steward_orgs(bind)

    created = _event_orgs(bind, "dataset.create")
    dataset_owner: dict[str, str] = {}
    for name, created_by in bind.execute(sa.text("SELECT name, created_by FROM datasets")).all():
        owner = created.get(name) or stewards.get(created_by) or UNKNOWN_OWNER
        dataset_owner[name] = owner
        bind.execute(sa.text("UPDATE datasets SET owner_org = :owner WHERE name = :name"),
                     {"owner": owner, "name": name})

    granted = _event_orgs(bind, "contract.create")
    contracts = sa.table("contracts", sa.column("id", sa.String), sa.column("datasets", sa.JSON),
                         sa.column("created_by", sa.String))
    for contract_id, names, created_by in bind.execute(
            sa.select(contracts.c.id, contracts.c.datasets, contracts.c.created_by)).all():
        holders = {dataset_owner.get(str(name), UNKNOWN_OWNER) for name in (names or [])}
        by_data = next(iter(holders)) if len(holders) == 1 else None
        owner = granted.get(contract_id) or (by_data if by_data != UNKNOWN_OWNER else None) \
            or stewards.get(created_by) or UNKNOWN_OWNER
        bind.execute(sa.text("UPDATE contracts SET owner_org = :owner WHERE id = :id"),
                     {"owner": owner, "id": contract_id})

    proposed = _event_orgs(bind, "policy.propose")
    for policy_id, name, version, created_by in bind.execute(
            sa.text("SELECT id, name, version, created_by FROM policies")).all():
        if created_by == "system":
            continue  # shipped: global
        owner = proposed.get(f"{name}@{version}") or stewards.get(created_by) or UNKNOWN_OWNER
        bind.execute(sa.text("UPDATE policies SET owner_org = :owner WHERE id = :id"),
                     {"owner": owner, "id": policy_id})


def downgrade() -> None:
    for table in ("policies", "contracts", "datasets"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"ix_{table}_owner_org")
            batch_op.drop_column("owner_org")
