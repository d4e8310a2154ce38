"""Migration 0008 gives existing datasets, contracts and policy versions their owner org, from the audit
log first, then the creating steward's issued tokens; what neither settles fails closed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pgdb import run_migration

from sandbox.auth.orgs import UNKNOWN_OWNER
from sandbox.store.database import make_engine


def _rows(connection: sa.Connection, tables: sa.MetaData, now: datetime) -> None:
    t = tables.tables
    card: dict[str, Any] = {"name": "x"}
    for name, created_by in (("audited", "ana"), ("by-token", "ben"), ("orphan", "ghost"), ("ambiguous", "two-orgs")):
        connection.execute(t["datasets"].insert().values(
            name=name, title=name, description="", card=card, privacy_unit="pid", privacy_unit_rows="many",
            columns={}, created_by=created_by, created_at=now))
    events = (("dataset.create", "audited", "hospital"), ("contract.create", "c-audited", "hospital"),
              ("policy.propose", "default@2", "hospital"), ("dataset.create", "orphan", "-"))
    for seq, (action, object_id, org) in enumerate(events, start=1):
        connection.execute(t["audit_events"].insert().values(
            seq=seq, at=now, actor="ana", org=org, role="steward", action=action, object_type="x",
            object_id=object_id, details={}, prev_hash="0" * 64, hash=f"{seq:064d}"))
    for jti, sub, org in (("t1", "ben", "clinic"), ("t2", "ben", "clinic"), ("t3", "two-orgs", "a"),
                          ("t4", "two-orgs", "b"), ("t5", "eve", "acme")):
        connection.execute(t["issued_tokens"].insert().values(
            jti=jti, sub=sub, org=org, role="steward" if sub != "eve" else "buyer", issued_at=now, expires_at=now))
    connection.execute(t["issued_tokens"].insert().values(
        jti="t6", sub="ghost", org="acme", role="buyer", issued_at=now, expires_at=now))
    for contract_id, datasets, created_by in (("c-audited", ["orphan"], "ghost"), ("c-by-data", ["by-token"], "ghost"),
                                              ("c-orphan", ["orphan"], "ghost")):
        connection.execute(t["contracts"].insert().values(
            id=contract_id, buyer_org="acme", datasets=datasets, tier="aggregate", kinds=["analysis"], purpose="p",
            valid_from=now, valid_until=now, epsilon=1.0, delta=0.0, quotas={}, policy_name="default",
            policy_version=1, created_by=created_by, created_at=now))
    for version, created_by in ((1, "system"), (2, "ana"), (3, "ben"), (4, "ghost")):
        connection.execute(t["policies"].insert().values(
            name="default", version=version, body={}, sha256=str(version) * 64, status="approved",
            created_by=created_by, created_at=now, comment=""))


def test_backfill_takes_the_creators_org_and_fails_closed(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        run_migration(engine, store_url, "head")
        run_migration(engine, store_url, "0007", down=True)
        with engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM policies"))
            connection.execute(sa.text("DELETE FROM audit_events"))
            connection.execute(sa.text("DELETE FROM issued_tokens"))
            tables = sa.MetaData()
            tables.reflect(connection, only=["datasets", "contracts", "policies", "audit_events", "issued_tokens"])
            _rows(connection, tables, datetime.now(UTC))
        run_migration(engine, store_url, "head")
        with engine.connect() as connection:
            datasets = dict(connection.execute(sa.text("SELECT name, owner_org FROM datasets")).all())
            contracts = dict(connection.execute(sa.text("SELECT id, owner_org FROM contracts")).all())
            policies = dict(connection.execute(sa.text("SELECT version, owner_org FROM policies")).all())
    finally:
        engine.dispose()
    assert datasets == {"audited": "hospital", "by-token": "clinic", "orphan": UNKNOWN_OWNER,
                        "ambiguous": UNKNOWN_OWNER}, "datasets: audit event, then one-org steward tokens, else unknown"
    assert contracts == {"c-audited": "hospital", "c-by-data": "clinic", "c-orphan": UNKNOWN_OWNER}, contracts
    assert policies == {1: None, 2: "hospital", 3: "clinic", 4: UNKNOWN_OWNER}, "shipped stays global" + str(policies)
