"""The budget ledger: reserved before noise, never overspent, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo

from sandbox.auth.tokens import Principal, Role
from sandbox.dp.queries import QueryRequest, run_query
from sandbox.errors import SandboxError
from sandbox.instance import Instance
from sandbox.store.models import BudgetLedger, DatasetBudget

SQL = 'SELECT sex, COUNT(*) AS n FROM "carotid-stenting" WHERE age >= {age} GROUP BY sex'


def contract(api: TestClient, steward: str, *, epsilon: float, org: str = "acme") -> str:
    response = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": org, "datasets": ["carotid-stenting"], "tier": "dp_only", "kinds": ["query"],
        "purpose": "budget", "valid_until": "2099-01-01", "epsilon": epsilon, "policy": "dp-only"})
    assert response.status_code == 201, response.text
    identifier: str = response.json()["id"]
    return identifier


def buyer(org: str = "acme") -> Principal:
    return Principal(sub="alice", org=org, role=Role.BUYER, jti="test", issuer="sandbox",
                     expires_at=datetime.now(UTC) + timedelta(hours=1))


def spent(instance: Instance, contract_id: str) -> tuple[float, float]:
    with instance.sessions() as session:
        row = session.query(BudgetLedger).filter_by(contract_id=contract_id).one()
        return row.epsilon_spent, row.epsilon_reserved


@pytest.fixture
def world(api: TestClient, tokens: Tokens, tmp_path: Path) -> dict[str, Any]:
    steward = tokens.steward()
    register_demo(api, steward, tmp_path, procedures=600)
    return {"steward": steward}


def test_fifty_concurrent_queries_never_overspend(instance: Instance, api: TestClient,
                                                  world: dict[str, Any]) -> None:
    contract_id = contract(api, world["steward"], epsilon=1.0)
    start = threading.Barrier(50)

    def ask(n: int) -> str:
        start.wait()
        try:
            run_query(instance, buyer(), QueryRequest(contract=contract_id, dataset="carotid-stenting",
                                                      sql=SQL.format(age=20 + n), epsilon=0.1))
            return "answered"
        except SandboxError as exc:
            assert exc.status == 409, exc.detail
            return "refused"

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(ask, range(50)))
    total, reserved = spent(instance, contract_id)
    assert outcomes.count("answered") == 10, f"{outcomes.count('answered')} queries of 0.1 fit into 1.0"
    assert total == pytest.approx(1.0), f"spent {total} of 1.0"
    with instance.sessions() as session:
        row = session.query(BudgetLedger).filter_by(contract_id=contract_id).one()
        assert row.epsilon_spent_units == row.epsilon_total_units == 1_000_000, "integer spend is not exact"
    assert reserved == pytest.approx(0.0), "reservations were left held"


def test_global_cap_binds_across_contracts(instance: Instance, api: TestClient, world: dict[str, Any]) -> None:
    steward = world["steward"]
    capped = api.post("/v1/datasets/carotid-stenting/budget-cap", headers=auth(steward), json={"epsilon_cap": 0.5})
    assert capped.status_code == 200, capped.text
    first = contract(api, steward, epsilon=1.0, org="acme")
    second = contract(api, steward, epsilon=1.0, org="rival")
    for n in range(3):
        run_query(instance, buyer("acme"), QueryRequest(contract=first, dataset="carotid-stenting",
                                                        sql=SQL.format(age=30 + n), epsilon=0.1))
    run_query(instance, buyer("rival"), QueryRequest(contract=second, dataset="carotid-stenting",
                                                     sql=SQL.format(age=40), epsilon=0.2))
    with pytest.raises(SandboxError, match="dataset-wide privacy budget") as refused:
        run_query(instance, buyer("rival"), QueryRequest(contract=second, dataset="carotid-stenting",
                                                         sql=SQL.format(age=41), epsilon=0.01))
    assert refused.value.status == 409
    with instance.sessions() as session:
        cap = session.get(DatasetBudget, "carotid-stenting")
        assert cap is not None and cap.epsilon_spent == pytest.approx(0.5)


def test_a_failed_query_gives_its_reservation_back(instance: Instance, api: TestClient,
                                                   world: dict[str, Any]) -> None:
    contract_id = contract(api, world["steward"], epsilon=1.0)
    stored = next((instance.settings.artifacts_dir / "datasets" / "carotid-stenting").glob("v1.parquet"))
    stored.chmod(0o644)
    stored.rename(stored.with_suffix(".moved"))
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever the engine raises on a missing file
            run_query(instance, buyer(), QueryRequest(contract=contract_id, dataset="carotid-stenting",
                                                      sql=SQL.format(age=50), epsilon=0.3))
    finally:
        stored.with_suffix(".moved").rename(stored)
    assert spent(instance, contract_id) == (0.0, 0.0), "a query that failed was charged"


def test_over_budget_and_cached_answers_through_the_api(api: TestClient, tokens: Tokens,
                                                        world: dict[str, Any]) -> None:
    contract_id = contract(api, world["steward"], epsilon=1.0)
    headers = auth(tokens.buyer(org="acme"))
    body = {"contract": contract_id, "dataset": "carotid-stenting", "sql": SQL.format(age=60), "epsilon": 0.6}
    first = api.post("/v1/queries", headers=headers, json=body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["epsilon_spent"] == 0.6 and answer["epsilon_remaining"] == pytest.approx(0.4)
    assert len(answer["accuracy"]) == len(answer["rows"]) and not answer["cached"]
    again = api.post("/v1/queries", headers=headers, json=body).json()
    assert again["cached"] and again["epsilon_spent"] == 0.0 and again["rows"] == answer["rows"]
    over = api.post("/v1/queries", headers=headers, json={**body, "sql": SQL.format(age=61)})
    assert over.status_code == 409 and over.headers["content-type"].startswith("application/problem+json")
    assert "nothing was spent" in over.json()["detail"]
    budgets = api.get("/v1/budgets", headers=headers).json()
    assert len(budgets) == 1 and budgets[0]["epsilon_spent"] == pytest.approx(0.6)
    rival = api.post("/v1/queries", headers=auth(tokens.buyer(org="rival")), json=body)
    assert rival.status_code == 404, "another org used this contract"
