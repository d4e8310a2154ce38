"""Licence terms on contracts: a contract cannot grant a use the dataset's licence forbids, nor be used for one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card

from sandbox.auth.tokens import Principal, Role
from sandbox.catalog.cards import USE_KINDS, LicenceTerms
from sandbox.contracts import JobKind, licence_problems, require_usable
from sandbox.errors import ContractNotUsable
from sandbox.instance import Instance
from sandbox.store.models import Dataset


def contract_body(**changes: Any) -> dict[str, Any]:
    return {"buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
            "purpose": "stroke risk model", "valid_until": "2099-01-01", "epsilon": 1.0, **changes}


def create(api: TestClient, steward: str, name: str, licence: Any) -> None:
    response = api.post("/v1/datasets", json={**demo_card(name), "licence": licence}, headers=auth(steward))
    assert response.status_code == 201, response.text


def test_contract_kinds_are_the_licence_use_kinds() -> None:
    assert {kind.value for kind in JobKind} == set(USE_KINDS), "a contract kind no licence can name (or the reverse)"


def test_training_on_a_no_training_licence_is_refused_naming_the_dataset(api: TestClient, tokens: Tokens) -> None:
    steward = tokens.steward()
    create(api, steward, "carotid-stenting", {"name": "Registry NC 1.0", "training_allowed": False})
    create(api, steward, "second-registry", "Open registry licence")
    for kinds in (["analysis", "training"], ["dp_training"]):
        refused = api.post("/v1/contracts", json=contract_body(kinds=kinds, datasets=["second-registry",
                                                                                      "carotid-stenting"]),
                           headers=auth(steward))
        assert refused.status_code == 422, f"{kinds} granted on a no-training licence: {refused.text}"
        errors = refused.json()["errors"]
        assert len(errors) == 1, errors
        assert "carotid-stenting" in errors[0] and "Registry NC 1.0" in errors[0] and kinds[-1] in errors[0], errors
    granted = api.post("/v1/contracts", json=contract_body(kinds=["analysis", "query", "notebook"]),
                       headers=auth(steward))
    assert granted.status_code == 201, granted.text
    assert [c["id"] for c in api.get("/v1/contracts", headers=auth(steward)).json()] == [granted.json()["id"]]


def test_permitted_uses_without_query_refuses_a_query_contract(api: TestClient, tokens: Tokens) -> None:
    steward = tokens.steward()
    create(api, steward, "carotid-stenting", {"name": "Analysis only", "permitted_uses": ["analysis", "training"]})
    refused = api.post("/v1/contracts", json=contract_body(kinds=["query"]), headers=auth(steward))
    assert refused.status_code == 422, refused.text
    assert any("carotid-stenting" in e and "query" in e and "Analysis only" in e for e in refused.json()["errors"])
    for kinds in (["analysis"], ["training"], ["analysis", "training"]):
        granted = api.post("/v1/contracts", json=contract_body(kinds=kinds), headers=auth(steward))
        assert granted.status_code == 201, f"{kinds}: {granted.text}"


def test_a_plain_string_licence_permits_every_use(api: TestClient, tokens: Tokens) -> None:
    steward = tokens.steward()
    create(api, steward, "carotid-stenting", "Demo use only")
    shown = api.get("/v1/datasets/carotid-stenting", headers=auth(tokens.buyer())).json()["licence"]
    assert shown["name"] == "Demo use only" and shown["training_allowed"] is True
    granted = api.post("/v1/contracts", json=contract_body(kinds=list(USE_KINDS)), headers=auth(steward))
    assert granted.status_code == 201, granted.text


def test_licence_problems_are_pure_and_name_each_forbidden_kind() -> None:
    strict = LicenceTerms(name="Strict", permitted_uses=["analysis", "training"], training_allowed=False)
    problems = licence_problems(strict, dataset="d", kinds=list(JobKind))
    assert len(problems) == 4 and all("'d'" in p and "Strict" in p for p in problems)
    assert licence_problems(LicenceTerms(), dataset="d", kinds=list(JobKind)) == []
    assert "its licence" in licence_problems(LicenceTerms(permitted_uses=[]), dataset="d", kinds=[JobKind.QUERY])[0]


def buyer() -> Principal:
    return Principal(sub="analyst-1", org="acme", role=Role.BUYER, jti=uuid.uuid4().hex, issuer="sandbox",
                     expires_at=datetime.now(UTC) + timedelta(hours=1))


def test_a_licence_made_stricter_stops_an_existing_contract(api: TestClient, tokens: Tokens,
                                                            instance: Instance) -> None:
    steward = tokens.steward()
    create(api, steward, "carotid-stenting", {"name": "Open 1.0"})
    contract = api.post("/v1/contracts", json=contract_body(kinds=["analysis", "training"]), headers=auth(steward))
    assert contract.status_code == 201, contract.text
    contract_id = contract.json()["id"]
    with instance.context(buyer()) as ctx:
        require_usable(ctx, contract_id, kind=JobKind.TRAINING, dataset="carotid-stenting")
    # A later card forbids training (no endpoint changes a card today; the store stands in for one).
    with instance.sessions() as session, session.begin():
        dataset = session.query(Dataset).filter_by(name="carotid-stenting").one()
        dataset.card = {**dataset.card, "licence": {"name": "Open 2.0", "training_allowed": False}}
    with pytest.raises(ContractNotUsable, match=r"Open 2\.0"), instance.context(buyer()) as ctx:
        require_usable(ctx, contract_id, kind=JobKind.TRAINING, dataset="carotid-stenting")
    with instance.context(buyer()) as ctx:
        assert require_usable(ctx, contract_id, kind=JobKind.ANALYSIS, dataset="carotid-stenting").id == contract_id
