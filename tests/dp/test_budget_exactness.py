"""Budgets are exact, on a public grid, private to their contract, and never left held (review 10, 11.4-11.8).

Every test runs on SQLite and PostgreSQL (the `api`/`instance` fixtures are parametrised).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card, register_demo
from pydantic import ValidationError
from sqlalchemy import select, update

from sandbox.budgets import ledger
from sandbox.budgets.cost import EPSILON_STEP_UNITS, PrivacyCost, epsilon_units_up
from sandbox.config import Settings
from sandbox.dp import queries
from sandbox.dp.duckdb_engine import execute
from sandbox.dp.plan import DatasetPrivacy, plan_query
from sandbox.instance import Instance
from sandbox.store.models import BudgetLedger, BudgetReservation, DatasetBudget

DATASET = "carotid-stenting"
SQL = 'SELECT sex, COUNT(*) AS n FROM "carotid-stenting" WHERE age >= {age} GROUP BY sex'


def make_contract(api: TestClient, steward: str, *, epsilon: float, org: str = "acme", delta: float = 0.0,
                  dataset: str = DATASET) -> str:
    response = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": org, "datasets": [dataset], "tier": "dp_only", "kinds": ["query"], "purpose": "budget",
        "valid_until": "2099-01-01", "epsilon": epsilon, "delta": delta, "policy": "dp-only"})
    assert response.status_code == 201, response.text
    identifier: str = response.json()["id"]
    return identifier


def ask(api: TestClient, token: str, contract: str, sql: str, **budget: float) -> Any:
    return api.post("/v1/queries", headers=auth(token), json={"contract": contract, "dataset": DATASET,
                                                               "sql": sql, **budget})


def ledger_row(instance: Instance, contract: str) -> BudgetLedger:
    with instance.sessions() as session:
        row = session.execute(select(BudgetLedger).where(BudgetLedger.contract_id == contract)).scalar_one()
        session.expunge(row)
        return row


def on_grid(value: float) -> bool:
    return abs(value * 1000 - round(value * 1000)) < 1e-9


@pytest.fixture
def world(api: TestClient, tokens: Tokens, tmp_path: Path) -> dict[str, str]:
    steward = tokens.steward()
    register_demo(api, steward, tmp_path, procedures=400)
    return {"steward": steward, "buyer": tokens.buyer(org="acme"), "rival": tokens.buyer(org="rival")}


# --- 1. epsilon on a fixed grid -------------------------------------------------------------------------

@pytest.mark.parametrize("epsilon", [0.0015, 0.005, 0.009, 1e-9, 0.1000001, 0.12345, 0.0099999])
def test_an_epsilon_off_the_grid_or_below_the_minimum_is_refused(api: TestClient, instance: Instance,
                                                                 world: dict[str, str], epsilon: float) -> None:
    contract = make_contract(api, world["steward"], epsilon=1.0)
    response = ask(api, world["buyer"], contract, SQL.format(age=30), epsilon=epsilon)
    assert response.status_code == 422, f"epsilon {epsilon!r} was accepted: {response.text}"
    assert "steps of 0.001" in response.text and "at least 0.01" in response.text, response.text
    assert ledger_row(instance, contract).epsilon_spent_units == 0, "a refused request was charged"


@pytest.mark.parametrize("rho", [0.0005, 0.0101, 1e-7])
def test_rho_off_the_grid_is_refused_too(api: TestClient, world: dict[str, str], rho: float) -> None:
    contract = make_contract(api, world["steward"], epsilon=100.0, delta=1e-5)
    response = ask(api, world["buyer"], contract, SQL.format(age=30), rho=rho, delta=1e-6)
    assert response.status_code == 422, response.text


def test_the_socket_path_refuses_off_grid_epsilons_the_same_way() -> None:
    for epsilon in (0.0015, 1e-9, 0.005):
        with pytest.raises(ValidationError, match=r"steps of 0\.001"):
            queries.request_from_socket({"sql": "SELECT COUNT(*) FROM x", "epsilon": epsilon},
                                        contract="c", dataset="d")
    accepted = queries.request_from_socket({"sql": "SELECT COUNT(*) FROM x", "epsilon": 0.013}, contract="c",
                                           dataset="d")
    assert accepted.epsilon == 0.013


def test_budgets_shown_to_buyers_are_on_the_grid(api: TestClient, world: dict[str, str]) -> None:
    # A total off the grid, and a zCDP charge (an irrational conversion) rounded up onto it.
    contract = make_contract(api, world["steward"], epsilon=7.1234567, delta=1e-5)
    first = ask(api, world["buyer"], contract, SQL.format(age=30), epsilon=0.013).json()
    second = ask(api, world["buyer"], contract, SQL.format(age=31), rho=0.011, delta=1e-6).json()
    for answer in (first, second):
        assert on_grid(answer["epsilon_spent"]) and on_grid(answer["epsilon_remaining"]), answer
    [budget] = api.get("/v1/budgets", headers=auth(world["buyer"])).json()
    for name in ("epsilon_total", "epsilon_spent", "epsilon_remaining", "epsilon_reserved"):
        assert on_grid(budget[name]), f"{name} = {budget[name]!r} is finer than the grid"
    assert budget["epsilon_total"] == pytest.approx(7.123)
    assert budget["epsilon_spent"] == pytest.approx(first["epsilon_spent"] + second["epsilon_spent"])
    assert budget["epsilon_remaining"] == pytest.approx(second["epsilon_remaining"])


# --- 2. exact arithmetic --------------------------------------------------------------------------------

def test_tiny_charges_never_pass_an_exhausted_budget(api: TestClient, instance: Instance,
                                                     world: dict[str, str]) -> None:
    contract = make_contract(api, world["steward"], epsilon=0.3)
    for age in (30, 31, 32):
        assert ask(api, world["buyer"], contract, SQL.format(age=age), epsilon=0.1).status_code == 200
    # Below the API's grid the ledger itself must still refuse the smallest unit it knows.
    for n in range(50):
        with pytest.raises(ledger.BudgetExhausted), instance.sessions() as session, session.begin():
            ledger.reserve(session, contract_id=contract, dataset=DATASET, cost=PrivacyCost(epsilon_units=1),
                           query_key=f"tiny-{n}")
    row = ledger_row(instance, contract)
    assert row.epsilon_spent_units == row.epsilon_total_units == 300_000, "spent more than the total"
    assert row.epsilon_reserved_units == 0


def test_a_pure_dp_contract_spends_no_delta(api: TestClient, instance: Instance, world: dict[str, str]) -> None:
    contract = make_contract(api, world["steward"], epsilon=1.0, delta=0.0)
    for delta in (1e-9, 1e-12, 1e-6):
        response = ask(api, world["buyer"], contract, SQL.format(age=40), epsilon=0.1, delta=delta)
        assert response.status_code == 409 and "pure DP" in response.json()["detail"], response.text
    row = ledger_row(instance, contract)
    assert (row.epsilon_spent_units, row.delta_spent_units, row.epsilon_reserved_units) == (0, 0, 0)


def test_concurrent_queries_of_two_contracts_never_overspend_the_dataset_cap(
        api: TestClient, instance: Instance, world: dict[str, str]) -> None:
    capped = api.post(f"/v1/datasets/{DATASET}/budget-cap", headers=auth(world["steward"]), json={"epsilon_cap": 0.5})
    assert capped.status_code == 200, capped.text
    contracts = [make_contract(api, world["steward"], epsilon=1.0, org=org) for org in ("acme", "rival")]
    start = threading.Barrier(20)

    def one(n: int) -> int:
        start.wait()
        token = world["buyer"] if n % 2 == 0 else world["rival"]
        return ask(api, token, contracts[n % 2], SQL.format(age=20 + n), epsilon=0.05).status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one, range(20)))
    assert statuses.count(200) == 10 and statuses.count(409) == 10, statuses
    with instance.sessions() as session:
        cap = session.get(DatasetBudget, DATASET)
        assert cap is not None and cap.epsilon_spent_units == 500_000 and cap.epsilon_reserved_units == 0


# --- 5. reservations never leak -----------------------------------------------------------------------

def test_identical_concurrent_queries_fly_once(api: TestClient, instance: Instance, world: dict[str, str]) -> None:
    contract = make_contract(api, world["steward"], epsilon=1.0)
    start = threading.Barrier(8)

    def one(_: int) -> Any:
        start.wait()
        return ask(api, world["buyer"], contract, SQL.format(age=50), epsilon=0.2)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    answers = [r.json() for r in responses]
    assert sum(not a["cached"] for a in answers) == 1, "more than one identical query was charged"
    assert all(a["rows"] == answers[0]["rows"] for a in answers), "identical queries got different answers"
    row = ledger_row(instance, contract)
    assert (row.epsilon_spent_units, row.epsilon_reserved_units) == (200_000, 0)


def test_a_failing_final_transaction_gives_the_reservation_back(
        api: TestClient, instance: Instance, world: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    contract = make_contract(api, world["steward"], epsilon=1.0)
    # An answer the store cannot serialise: the final transaction fails in the database layer.
    monkeypatch.setattr(queries, "_json_safe", lambda rows: [[object()]])
    response = ask(api, world["buyer"], contract, SQL.format(age=60), epsilon=0.3)
    assert response.status_code == 500 and "Traceback" not in response.text
    row = ledger_row(instance, contract)
    assert (row.epsilon_spent_units, row.epsilon_reserved_units) == (0, 0), "a failed query kept its reservation"
    with instance.sessions() as session:
        states = set(session.execute(select(BudgetReservation.state)).scalars())
    assert states == {"released"}, states


def held_by_a_dead_process(instance: Instance, contract: str, units: int) -> str:
    """A reservation as a process that has since died left it: reserved, under another holder."""
    with instance.sessions() as session, session.begin():
        held = ledger.reserve(session, contract_id=contract, dataset=DATASET,
                              cost=PrivacyCost(epsilon_units=units), query_key="killed")
        session.execute(update(BudgetReservation).where(BudgetReservation.id == held.id)
                        .values(holder="gone-host:4242:0000"))
        return held.id


def test_a_starting_worker_service_gives_back_what_a_killed_process_reserved(
        api: TestClient, instance: Instance, settings: Settings, world: dict[str, str]) -> None:
    """Reservations are the worker's: its local service settles a dead holder's before it answers. The API
    process does not (in another container it could not tell a live worker's reservation from a dead one's)."""
    from sandbox.api.app import create_app
    from sandbox.worker_socket import serve_worker_socket

    contract = make_contract(api, world["steward"], epsilon=1.0)
    held_by_a_dead_process(instance, contract, 300_000)
    restarted = Instance(settings)
    try:
        with TestClient(create_app(restarted)):
            assert ledger_row(instance, contract).epsilon_reserved_units == 300_000
        served = serve_worker_socket(restarted)
        try:
            assert ledger_row(instance, contract).epsilon_reserved_units == 0
        finally:
            served.close()
    finally:
        restarted.close()


def test_reservations_of_a_killed_process_are_released_at_startup(
        api: TestClient, instance: Instance, settings: Settings, world: dict[str, str]) -> None:
    contract = make_contract(api, world["steward"], epsilon=1.0)
    held_by_a_dead_process(instance, contract, 400_000)
    assert ledger_row(instance, contract).epsilon_reserved_units == 400_000
    restarted = Instance(settings)
    try:
        assert queries.settle_abandoned_reservations(restarted) == 1
        assert queries.settle_abandoned_reservations(restarted) == 0
    finally:
        restarted.close()
    row = ledger_row(instance, contract)
    assert (row.epsilon_reserved_units, row.epsilon_spent_units) == (0, 0)
    # A process's own reservations are not its own abandoned ones.
    with instance.sessions() as session, session.begin():
        mine = ledger.reserve(session, contract_id=contract, dataset=DATASET,
                              cost=PrivacyCost(epsilon_units=10_000), query_key="live")
        assert ledger.release_abandoned(session) == 0
        ledger.settle(session, mine.id, spent=False)


def test_a_released_reservation_cannot_be_committed(api: TestClient, instance: Instance,
                                                    world: dict[str, str]) -> None:
    contract = make_contract(api, world["steward"], epsilon=1.0)
    with instance.sessions() as session, session.begin():
        held = ledger.reserve(session, contract_id=contract, dataset=DATASET,
                              cost=PrivacyCost(epsilon_units=100_000), query_key="lost")
        ledger.release_abandoned(session, holder="someone-else")
        with pytest.raises(ledger.ReservationLost):
            ledger.settle(session, held.id, spent=True)


def _date_world(api: TestClient, steward: str, tmp_path: Path) -> None:
    card = {"name": "visits", "title": "visits", "privacy_unit": "pid", "privacy_unit_rows": "one",
            "columns": {"pid": {"type": "string"}, "visit_date": {"type": "date"}, "seen_at": {"type": "timestamp"},
                        "age": {"type": "integer", "bounds": [0, 100], "public": True}}}
    assert api.post("/v1/datasets", json=card, headers=auth(steward)).status_code == 201
    count = 600
    table = pa.table({
        "pid": [f"P{i:05d}" for i in range(count)],
        "visit_date": [dt.date(2024, 1, 1 + i % 2) for i in range(count)],
        "seen_at": [dt.datetime(2024, 1, 1, 8 + i % 2) for i in range(count)],
        "age": [20 + i % 60 for i in range(count)]})
    path = tmp_path / "visits.parquet"
    pq.write_table(table, path)
    with path.open("rb") as handle:
        response = api.post("/v1/datasets/visits/versions", files={"file": (path.name, handle)}, headers=auth(steward))
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(("column", "expected"), [("visit_date", {"2024-01-01", "2024-01-02"}),
                                                  ("seen_at", {"2024-01-01T08:00:00", "2024-01-01T09:00:00"})])
def test_date_and_timestamp_group_keys_are_answered(api: TestClient, instance: Instance, world: dict[str, str],
                                                    tmp_path: Path, column: str, expected: set[str]) -> None:
    _date_world(api, world["steward"], tmp_path)
    contract = make_contract(api, world["steward"], epsilon=10.0, delta=1e-5, dataset="visits")
    body = {"contract": contract, "dataset": "visits", "epsilon": 2.0, "delta": 1e-6,
            "sql": f"SELECT {column}, COUNT(*) AS n FROM visits GROUP BY {column}"}
    first = api.post("/v1/queries", headers=auth(world["buyer"]), json=body)
    assert first.status_code == 200, first.text
    assert {row[0] for row in first.json()["rows"]} == expected
    again = api.post("/v1/queries", headers=auth(world["buyer"]), json=body).json()
    assert again["cached"] and again["rows"] == first.json()["rows"]
    row = ledger_row(instance, contract)
    assert (row.epsilon_spent_units, row.epsilon_reserved_units) == (2_000_000, 0)


def test_decimal_date_and_timestamp_cells_become_json(tmp_path: Path) -> None:
    table = pa.table({"pid": [f"P{i}" for i in range(400)],
                      "price": pa.array([Decimal("1.25") if i % 2 else Decimal("2.50") for i in range(400)],
                                        type=pa.decimal128(5, 2))})
    pq.write_table(table, tmp_path / "prices.parquet")
    privacy = DatasetPrivacy(name="prices", privacy_unit="pid", one_row_per_unit=True,
                             columns={"pid": {"type": "string"}, "price": {"type": "float"}})
    plan = plan_query("SELECT price, COUNT(*) FROM prices GROUP BY price", privacy)
    answer = execute(plan, tmp_path / "prices.parquet", plan.cost(epsilon=2.0, delta=1e-6))
    safe = queries._json_safe(answer.rows)
    assert json.loads(json.dumps(safe)) == safe
    assert sorted(row[0] for row in safe) == [1.25, 2.5]
    assert queries._json_safe([[dt.date(2024, 2, 3), dt.datetime(2024, 2, 3, 4, 5), Decimal("0.1")]]) == [
        ["2024-02-03", "2024-02-03T04:05:00", 0.1]]


# --- 7. buyers see their own contracts only -------------------------------------------------------------

def test_buyers_do_not_see_other_tenants_spend(api: TestClient, world: dict[str, str]) -> None:
    steward = world["steward"]
    api.post(f"/v1/datasets/{DATASET}/budget-cap", headers=auth(steward), json={"epsilon_cap": 5.0})
    mine = make_contract(api, steward, epsilon=1.0, org="acme")
    theirs = make_contract(api, steward, epsilon=4.0, org="rival")
    before = api.get("/v1/budgets", headers=auth(world["buyer"])).json()
    assert ask(api, world["rival"], theirs, SQL.format(age=30), epsilon=3.9).status_code == 200
    after = api.get("/v1/budgets", headers=auth(world["buyer"])).json()
    assert before == after, f"a rival's spend changed what acme sees: {before} -> {after}"
    assert [b["contract"] for b in after] == [mine]
    shown = {key for key in after[0] if key.startswith("dataset_")}
    assert shown <= {"dataset_epsilon_cap"}, f"dataset-wide spend shown to a buyer: {after[0]}"
    answer = ask(api, world["buyer"], mine, SQL.format(age=31), epsilon=0.05).json()
    assert answer["epsilon_remaining"] == pytest.approx(0.95), "the answer's remainder reflects others' spend"
    as_steward = {b["contract"]: b for b in api.get("/v1/budgets", headers=auth(steward)).json()}
    assert as_steward[theirs]["dataset_epsilon_spent"] == pytest.approx(3.95)
    assert as_steward[mine]["dataset_epsilon_cap"] == pytest.approx(5.0)


# --- 8. valid queries that used to fail with 500 --------------------------------------------------------

def test_a_quantile_without_group_by_is_answered(api: TestClient, world: dict[str, str]) -> None:
    contract = make_contract(api, world["steward"], epsilon=5.0, delta=1e-5)
    for sql, budget in (('SELECT MEDIAN(age) AS m FROM "carotid-stenting"', {"epsilon": 1.0}),
                        ('SELECT QUANTILE_CONT(age, 0.9) FROM "carotid-stenting"', {"rho": 0.1, "delta": 1e-6}),
                        ('SELECT MEDIAN(age), COUNT(*) FROM "carotid-stenting" WHERE age > 40', {"epsilon": 1.0})):
        response = ask(api, world["buyer"], contract, sql, **budget)
        assert response.status_code == 200, f"{sql}: {response.text}"
        value = response.json()["rows"][0][0]
        assert 18 <= value <= 90, value


def test_rho_with_private_group_keys_is_answered(api: TestClient, tokens: Tokens, tmp_path: Path) -> None:
    steward = tokens.steward()
    card = copy.deepcopy(demo_card("private-sites"))
    card["columns"]["site"]["public"] = False
    assert api.post("/v1/datasets", json=card, headers=auth(steward)).status_code == 201
    from sandbox.demo import write_registry

    path = write_registry(tmp_path / "private.parquet", procedures=2000)
    with path.open("rb") as handle:
        assert api.post("/v1/datasets/private-sites/versions", files={"file": (path.name, handle)},
                        headers=auth(steward)).status_code == 201
    contract = make_contract(api, steward, epsilon=50.0, delta=1e-5, dataset="private-sites")
    response = api.post("/v1/queries", headers=auth(tokens.buyer()), json={
        "contract": contract, "dataset": "private-sites", "rho": 1.0, "delta": 1e-6,
        "sql": 'SELECT site, COUNT(*) AS n, AVG(age) FROM "private-sites" GROUP BY site'})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["rows"] and on_grid(answer["epsilon_spent"]) and answer["epsilon_spent"] > 0


@pytest.mark.parametrize("keys", ["site", "age"])
def test_the_cost_is_computed_once_and_matches_the_engine(tmp_path: Path, keys: str) -> None:
    from sandbox.demo import write_registry

    privacy = DatasetPrivacy.from_card(demo_card())
    plan = plan_query(f'SELECT {keys}, COUNT(*) FROM "carotid-stenting" GROUP BY {keys}', privacy)
    request = queries.QueryRequest(contract="c", dataset=DATASET, sql="x", rho=0.5, delta=1e-6)
    cost = queries.charge_for(request, plan)
    assert cost.epsilon_units % EPSILON_STEP_UNITS == 0
    assert cost.threshold_delta == (0.0 if plan.public_keys else 5e-7), "private keys pay half of delta"
    answer = execute(plan, write_registry(tmp_path / "registry.parquet", procedures=400), cost)
    assert cost.covers(epsilon=answer.epsilon_spent, delta=answer.delta_spent), (cost, answer.epsilon_spent)
    assert epsilon_units_up(answer.epsilon_spent) == cost.epsilon_units, "the reserved cost is not what was spent"
    with pytest.raises(ValidationError, match="steps of 1e-12"):
        queries.QueryRequest(contract="c", dataset=DATASET, sql="x", epsilon=0.1, delta=1.5e-13)
