"""Contracts over HTTP: what a steward may write, what it pins, and who may revoke it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card

PROBLEM_JSON = "application/problem+json"


def contract_body(**changes: Any) -> dict[str, Any]:
    return {
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate",
        "kinds": ["analysis", "query"], "purpose": "stroke risk model", "valid_until": "2099-01-01",
        "epsilon": 1.0, **changes,
    }


def setup_catalog(api: TestClient, steward: str) -> None:
    for name in ("carotid-stenting", "second-registry"):
        response = api.post("/v1/datasets", json=demo_card(name), headers=auth(steward))
        assert response.status_code == 201, response.text


def test_invalid_contracts_are_422(api: TestClient, tokens: Tokens) -> None:
    steward, other_steward = tokens.steward(), tokens.steward("steward-2")
    setup_catalog(api, steward)
    proposed = api.post("/v1/policies", headers=auth(other_steward), json={
        **api.get("/v1/policies/default/versions/1", headers=auth(steward)).json()["body"],
        "description": "a pending change nobody approved"})
    assert proposed.status_code == 201 and proposed.json()["ref"] == "default@2", proposed.text

    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    cases: dict[str, dict[str, Any]] = {
        "valid_until in the past": contract_body(valid_until="2000-01-01"),
        "valid_until a moment ago": contract_body(valid_until=yesterday),
        "valid_until before valid_from": contract_body(valid_from="2098-01-01", valid_until="2097-01-01"),
        "unknown dataset": contract_body(datasets=["carotid-stenting", "no-such-dataset"]),
        "bad tier": contract_body(tier="gold"),
        "empty kinds": contract_body(kinds=[]),
        "unknown kind": contract_body(kinds=["analysis", "exfiltration"]),
        "repeated kind": contract_body(kinds=["analysis", "analysis"]),
        "epsilon zero": contract_body(epsilon=0),
        "epsilon negative": contract_body(epsilon=-1),
        "epsilon too large": contract_body(epsilon=1000),
        "epsilon as text": contract_body(epsilon="lots"),
        "delta at 1e-3": contract_body(delta=1e-3),
        "delta negative": contract_body(delta=-1e-9),
        "duplicate datasets": contract_body(datasets=["carotid-stenting", "carotid-stenting"]),
        "no datasets": contract_body(datasets=[]),
        "buyer_org with spaces": contract_body(buyer_org="Acme Corp"),
        "buyer_org empty": contract_body(buyer_org=""),
        "buyer_org traversal": contract_body(buyer_org="../acme"),
        "unknown policy": contract_body(policy="no-such-policy"),
        "unknown policy version": contract_body(policy="default@99"),
        "pending policy version": contract_body(policy="default@2"),
        "malformed policy reference": contract_body(policy="default@latest"),
        "unknown field": contract_body(price_per_row=0.01),
        "negative quota": contract_body(quotas={"cpu_hours": -5}),
        "missing purpose": {k: v for k, v in contract_body().items() if k != "purpose"},
    }
    for case, body in cases.items():
        response = api.post("/v1/contracts", json=body, headers=auth(steward))
        assert response.status_code == 422, f"{case}: {response.status_code} {response.text}"
        assert response.headers["content-type"] == PROBLEM_JSON, case
    for case, raw in {"epsilon NaN": '"epsilon": NaN', "epsilon Infinity": '"epsilon": Infinity',
                      "delta NaN": '"epsilon": 1.0, "delta": NaN'}.items():
        body = json.dumps(contract_body()).replace('"epsilon": 1.0', raw)
        response = api.post("/v1/contracts", content=body,
                            headers={**auth(steward), "content-type": "application/json"})
        assert response.status_code == 422, f"{case}: {response.status_code} {response.text}"
    assert api.get("/v1/contracts", headers=auth(steward)).json() == [], "an invalid contract was stored"


def test_contract_errors_name_each_problem(api: TestClient, tokens: Tokens) -> None:
    steward = tokens.steward()
    setup_catalog(api, steward)
    response = api.post("/v1/contracts", headers=auth(steward),
                        json=contract_body(valid_until="2001-01-01", datasets=["ghost-a", "ghost-b"]))
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    for needle in ("past", "'ghost-a'", "'ghost-b'"):
        assert any(needle in e for e in errors), f"no error mentions {needle}: {errors}"


def test_create_pins_the_policy_version(api: TestClient, tokens: Tokens) -> None:
    steward = tokens.steward()
    setup_catalog(api, steward)
    created = api.post("/v1/contracts", json=contract_body(), headers=auth(steward))
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"].startswith("c-") and body["policy"] == "default@1" and body["state"] == "active"
    strict = api.post("/v1/contracts", json=contract_body(policy="strict", tier="trusted"), headers=auth(steward))
    assert strict.status_code == 201 and strict.json()["policy"] == "strict@1", strict.text
    pinned = api.post("/v1/contracts", json=contract_body(policy="dp-only@1", tier="dp_only"), headers=auth(steward))
    assert pinned.status_code == 201 and pinned.json()["policy"] == "dp-only@1", pinned.text
    # A date means the whole UTC day.
    assert body["valid_until"].startswith("2099-01-01T23:59:59")


def test_only_stewards_write_contracts(api: TestClient, tokens: Tokens) -> None:
    setup_catalog(api, tokens.steward())
    for token in (tokens.buyer(), tokens.auditor(), tokens.admin()):
        response = api.post("/v1/contracts", json=contract_body(), headers=auth(token))
        assert response.status_code == 403, response.text
    assert api.get("/v1/contracts", headers=auth(tokens.steward())).json() == []


def test_revoke(api: TestClient, tokens: Tokens) -> None:
    steward, buyer = tokens.steward(), tokens.buyer("acme")
    setup_catalog(api, steward)
    contract_id = api.post("/v1/contracts", json=contract_body(), headers=auth(steward)).json()["id"]

    refused = api.post(f"/v1/contracts/{contract_id}/revoke", headers=auth(buyer))
    assert refused.status_code == 403, refused.text
    assert api.get(f"/v1/contracts/{contract_id}", headers=auth(buyer)).json()["state"] == "active", \
        "a buyer's revoke attempt changed the contract"

    revoked = api.post(f"/v1/contracts/{contract_id}/revoke", json={"reason": "audit finding"}, headers=auth(steward))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["state"] == "revoked" and revoked.json()["revoked_at"]
    again = api.post(f"/v1/contracts/{contract_id}/revoke", headers=auth(steward))
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM_JSON, again.text
    assert api.get(f"/v1/contracts/{contract_id}", headers=auth(buyer)).json()["state"] == "revoked"
    missing = api.post("/v1/contracts/c-000000000000/revoke", headers=auth(steward))
    assert missing.status_code == 404, missing.text

    events = api.get("/v1/audit", params={"action": "contract.revoke"}, headers=auth(tokens.auditor())).json()
    assert [e["object_id"] for e in events] == [contract_id]
    assert events[0]["details"]["reason"] == "audit finding"


def test_buyers_see_only_their_own_contracts(api: TestClient, tokens: Tokens) -> None:
    steward = tokens.steward()
    setup_catalog(api, steward)
    mine = api.post("/v1/contracts", json=contract_body(buyer_org="acme"), headers=auth(steward)).json()["id"]
    theirs = api.post("/v1/contracts", json=contract_body(buyer_org="globex"), headers=auth(steward)).json()["id"]
    acme = auth(tokens.buyer("acme"))
    assert [c["id"] for c in api.get("/v1/contracts", headers=acme).json()] == [mine]
    other = api.get(f"/v1/contracts/{theirs}", headers=acme)
    assert other.status_code == 404, f"another org's contract was shown: {other.text}"
    assert {c["id"] for c in api.get("/v1/contracts", headers=auth(steward)).json()} == {mine, theirs}
