"""When a contract may be used: pure rules, then `require_usable` against a real store and audit log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import demo_card
from sqlalchemy import select

from sandbox.audit import verify_chain
from sandbox.auth.tokens import Principal, Role
from sandbox.catalog.cards import DatasetCard
from sandbox.catalog.service import create_dataset, list_datasets
from sandbox.contracts import (
    ContractRequest,
    JobKind,
    Use,
    contract_state,
    create_contract,
    require_usable,
    revoke_contract,
    usability_problems,
)
from sandbox.errors import ContractNotUsable, Forbidden, NotFound
from sandbox.instance import Instance
from sandbox.store.models import AuditEvent, Contract

NOW = datetime(2030, 6, 15, 12, 0, tzinfo=UTC)


def contract(**changes: Any) -> Contract:
    fields: dict[str, Any] = {
        "id": "c-test", "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate",
        "kinds": ["analysis", "query"], "purpose": "test", "valid_from": NOW - timedelta(days=30),
        "valid_until": NOW + timedelta(days=30), "epsilon": 1.0, "delta": 0.0, "quotas": {},
        "policy_name": "default", "policy_version": 1, "revoked_at": None, "created_by": "steward-1",
        "created_at": NOW - timedelta(days=30),
    }
    return Contract(**{**fields, **changes})


ANALYSIS = Use(kind=JobKind.ANALYSIS, dataset="carotid-stenting", org="acme")


def test_an_active_contract_covers_its_use() -> None:
    assert contract_state(contract(), NOW) == "active"
    assert usability_problems(contract(), ANALYSIS, NOW) == []
    assert usability_problems(contract(), Use(JobKind.QUERY, "carotid-stenting", "acme"), NOW) == []


def test_validity_window_edges() -> None:
    window = contract(valid_from=NOW, valid_until=NOW + timedelta(hours=1))
    assert contract_state(window, NOW - timedelta(microseconds=1)) == "not_yet_valid"
    assert contract_state(window, NOW) == "active"
    assert contract_state(window, NOW + timedelta(hours=1)) == "active"
    assert contract_state(window, NOW + timedelta(hours=1, microseconds=1)) == "expired"


@pytest.mark.parametrize(("changes", "use", "needle"), [
    ({"valid_until": NOW - timedelta(seconds=1)}, ANALYSIS, "expired"),
    ({"revoked_at": NOW - timedelta(days=1)}, ANALYSIS, "revoked"),
    ({"valid_from": NOW + timedelta(days=1)}, ANALYSIS, "valid only from"),
    ({}, Use(JobKind.ANALYSIS, "carotid-stenting", "globex"), "another organisation"),
    ({}, Use(JobKind.ANALYSIS, "other-registry", "acme"), "'other-registry'"),
    ({}, Use(JobKind.TRAINING, "carotid-stenting", "acme"), "training"),
    ({"kinds": ["query"]}, Use(JobKind.NOTEBOOK, "carotid-stenting", "acme"), "notebook"),
])
def test_each_reason_a_contract_does_not_cover_a_use(changes: dict[str, Any], use: Use, needle: str) -> None:
    problems = usability_problems(contract(**changes), use, NOW)
    assert len(problems) == 1 and needle in problems[0], f"expected one problem about {needle!r}: {problems}"


def test_revocation_wins_over_every_other_state() -> None:
    revoked_and_expired = contract(revoked_at=NOW - timedelta(days=40), valid_until=NOW - timedelta(days=1))
    assert contract_state(revoked_and_expired, NOW) == "revoked"


def test_all_problems_are_listed() -> None:
    problems = usability_problems(contract(valid_until=NOW - timedelta(days=1)),
                                  Use(JobKind.TRAINING, "elsewhere", "globex"), NOW)
    assert len(problems) == 4, problems


def principal(role: Role, org: str, sub: str) -> Principal:
    return Principal(sub=sub, org=org, role=role, jti=uuid.uuid4().hex, issuer="sandbox",
                     expires_at=datetime.now(UTC) + timedelta(hours=1))


STEWARD = principal(Role.STEWARD, "hospital", "steward-1")
BUYER = principal(Role.BUYER, "acme", "analyst-1")


def make_contract(instance: Instance, **changes: Any) -> str:
    with instance.context(STEWARD) as ctx:
        if not list_datasets(ctx.session):
            create_dataset(ctx, DatasetCard.model_validate(demo_card()))
        request = ContractRequest.model_validate({
            "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
            "purpose": "test", "valid_until": "2099-01-01", "epsilon": 1.0, **changes})
        return create_contract(ctx, request).id


def use_as(instance: Instance, buyer: Principal, contract_id: str, kind: JobKind = JobKind.ANALYSIS,
           dataset: str = "carotid-stenting") -> Contract:
    with instance.context(buyer) as ctx:
        return require_usable(ctx, contract_id, kind=kind, dataset=dataset)


def denials(instance: Instance) -> list[AuditEvent]:
    with instance.sessions() as session:
        query = select(AuditEvent).where(AuditEvent.action == "access.denied").order_by(AuditEvent.seq)
        return list(session.execute(query).scalars())


def test_usable_contract_passes_without_a_denial(instance: Instance) -> None:
    contract_id = make_contract(instance)
    assert use_as(instance, BUYER, contract_id).id == contract_id
    assert denials(instance) == []


def test_expired_contract_is_refused_and_audited(instance: Instance) -> None:
    contract_id = make_contract(instance)
    with instance.sessions() as session, session.begin():
        row = session.get(Contract, contract_id)
        assert row is not None
        row.valid_from = datetime.now(UTC) - timedelta(days=10)
        row.valid_until = datetime.now(UTC) - timedelta(minutes=1)
    with pytest.raises(ContractNotUsable, match="expired"):
        use_as(instance, BUYER, contract_id)
    [denied] = denials(instance)
    assert (denied.actor, denied.org, denied.role) == ("analyst-1", "acme", "buyer")
    assert "expired" in denied.details["detail"]
    with instance.sessions() as session:
        assert verify_chain(session, instance.public_key).ok, "the denial broke the audit chain"


def test_revoked_contract_is_refused_and_audited(instance: Instance) -> None:
    contract_id = make_contract(instance)
    with instance.context(STEWARD) as ctx:
        revoke_contract(ctx, contract_id, "breach")
    with pytest.raises(ContractNotUsable, match="revoked"):
        use_as(instance, BUYER, contract_id)
    [denied] = denials(instance)
    assert denied.actor == "analyst-1" and "revoked" in denied.details["detail"]


def test_uses_outside_the_contract_are_refused(instance: Instance) -> None:
    contract_id = make_contract(instance)
    with pytest.raises(ContractNotUsable, match="training"):
        use_as(instance, BUYER, contract_id, kind=JobKind.TRAINING)
    with pytest.raises(ContractNotUsable, match="other-registry"):
        use_as(instance, BUYER, contract_id, dataset="other-registry")
    later = make_contract(instance, valid_from=(datetime.now(UTC) + timedelta(days=3)).isoformat())
    with pytest.raises(ContractNotUsable, match="valid only from"):
        use_as(instance, BUYER, later)
    assert len(denials(instance)) == 3


def test_other_orgs_and_other_roles_cannot_use_a_contract(instance: Instance) -> None:
    contract_id = make_contract(instance)
    with pytest.raises(NotFound):
        use_as(instance, principal(Role.BUYER, "globex", "spy"), contract_id)
    with pytest.raises(Forbidden):
        use_as(instance, STEWARD, contract_id)
    with pytest.raises(NotFound):
        use_as(instance, BUYER, "c-doesnotexist")
