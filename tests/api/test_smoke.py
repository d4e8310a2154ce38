"""The spine end to end through the ASGI app: register, upload, contract, audit."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo


def test_steward_registers_dataset_and_buyer_sees_only_public_card(api: TestClient, tokens: Tokens,
                                                                    tmp_path: Path) -> None:
    steward = tokens.steward()
    version = register_demo(api, steward, tmp_path)
    assert version["version"] == 1 and version["rows"] == 300 and len(version["sha256"]) == 64

    catalog = api.get("/v1/datasets", headers=auth(tokens.buyer()))
    assert catalog.status_code == 200
    [entry] = catalog.json()
    assert entry["columns"]["age"]["bounds"] == [18, 90]
    assert "rows" not in entry["versions"][0], "exact row count leaked to a buyer"

    contract = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate",
        "kinds": ["analysis", "query"], "purpose": "test", "valid_until": "2099-01-01", "epsilon": 1.0})
    assert contract.status_code == 201, contract.text
    assert contract.json()["policy"] == "default@1"

    events = api.get("/v1/audit", headers=auth(tokens.auditor())).json()
    actions = [e["action"] for e in events]
    assert {"dataset.create", "dataset.version.add", "contract.create"} <= set(actions)
