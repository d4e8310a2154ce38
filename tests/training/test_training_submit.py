"""Submitting training jobs through the API: the spec is checked against the card, a DP run's epsilon is held on
the contract's ledger before it is queued, and training and queries share that one budget."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from jobworld import pack
from sqlalchemy import select

from sandbox.instance import Instance
from sandbox.store.models import BudgetReservation, Job

DATASET = "carotid-stenting"
MODEL = "import torch\n\ndef build_model(n_features, n_outputs):\n    return torch.nn.Linear(n_features, n_outputs)\n"
FEATURES = ["age", "sex", "symptomatic", "stenosis_pct", "embolic_protection"]


@pytest.fixture
def world(api: TestClient, tokens: Tokens, tmp_path: Path) -> dict[str, Any]:
    steward = tokens.steward(org="hospital")
    register_demo(api, steward, tmp_path, procedures=300)

    def contract(**overrides: Any) -> str:
        body = {"buyer_org": "acme", "datasets": [DATASET], "tier": "dp_only",
                "kinds": ["dp_training", "query"], "purpose": "training", "valid_until": "2099-01-01",
                "epsilon": 1.0, "delta": 1e-5, **overrides}
        response = api.post("/v1/contracts", headers=auth(steward), json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    return {"steward": steward, "buyer": tokens.buyer(org="acme"), "contract": contract}


def submit(api: TestClient, buyer: str, contract: str, *, code: dict[str, str] | None = None,
           **training: Any) -> Any:
    spec: dict[str, Any] = {"contract": contract, "dataset": DATASET, "kind": "dp_training",
                            "training": {"label": "stroke_death_30d", "features": FEATURES, "epsilon": 0.5,
                                         **training}}
    for key in ("command", "image"):
        if key in training:
            spec[key] = spec["training"].pop(key)
    return api.post("/v1/jobs", headers=auth(buyer), data={"spec": json.dumps(spec)},
                    files={"code": ("code.tar.gz", pack(code if code is not None else {"model.py": MODEL}),
                                    "application/gzip")})


def budget(api: TestClient, buyer: str, contract: str) -> dict[str, Any]:
    rows = api.get("/v1/budgets", headers=auth(buyer)).json()
    return next(row for row in rows if row["contract"] == contract)


def test_a_dp_run_holds_its_epsilon_and_the_platform_fixes_its_command_and_encoding(
        api: TestClient, world: dict[str, Any], instance: Instance) -> None:
    contract = world["contract"]()
    response = submit(api, world["buyer"], contract, epsilon=0.6, epochs=2, batch_size=64)
    assert response.status_code == 201, response.text
    job = api.get(f"/v1/jobs/{response.json()['id']}", headers=auth(world["buyer"])).json()
    assert job["kind"] == "dp_training" and job["image"] == "training"
    assert job["command"] == ["python", "-I", "-m", "sandbox_trainer.run"]
    plan = job["training"]["plan"]
    assert plan["task"] == "classification" and plan["n_outputs"] == 2
    assert plan["feature_names"][:3] == ["age", "sex=F", "sex=M"] and plan["n_features"] == len(plan["feature_names"])
    assert job["training"]["epsilon"] == 0.6 and job["training"]["delta"] == pytest.approx(1e-6)
    assert job["training"]["max_rows_per_unit"] == 1
    shown = budget(api, world["buyer"], contract)
    assert shown["epsilon_reserved"] == pytest.approx(0.6) and shown["epsilon_remaining"] == pytest.approx(0.4)
    with instance.read_session() as session:
        reservation = session.execute(select(BudgetReservation)).scalar_one()
        assert reservation.holder == f"job:{job['id']}" and reservation.state == "reserved"


def test_training_and_queries_share_one_budget(api: TestClient, world: dict[str, Any]) -> None:
    contract = world["contract"]()
    assert submit(api, world["buyer"], contract, epsilon=0.7).status_code == 201
    query = api.post("/v1/queries", headers=auth(world["buyer"]), json={
        "contract": contract, "dataset": DATASET, "sql": f'SELECT COUNT(*) AS n FROM "{DATASET}"', "epsilon": 0.5})
    assert query.status_code == 409, query.text
    assert "0.3" in query.json()["detail"]
    again = submit(api, world["buyer"], contract, epsilon=0.5)
    assert again.status_code == 409 and "nothing was spent" in again.json()["detail"]
    assert submit(api, world["buyer"], contract, epsilon=0.3).status_code == 201
    assert budget(api, world["buyer"], contract)["epsilon_remaining"] == 0


def test_concurrent_runs_and_queries_never_overspend(api: TestClient, world: dict[str, Any],
                                                     instance: Instance) -> None:
    contract = world["contract"](epsilon=2.0)
    answers: list[int] = []

    def train() -> None:
        answers.append(submit(api, world["buyer"], contract, epsilon=0.3).status_code)

    def query(age: int) -> None:
        # Distinct queries: an identical one is answered once and costs nothing again.
        answers.append(api.post("/v1/queries", headers=auth(world["buyer"]), json={
            "contract": contract, "dataset": DATASET, "sql": f'SELECT COUNT(*) AS n FROM "{DATASET}" WHERE age > {age}',
            "epsilon": 0.3}).status_code)

    threads = [threading.Thread(target=train) if n % 2 else threading.Thread(target=query, args=(40 + n,))
               for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(answers) <= {200, 201, 409}, answers
    granted = sum(1 for a in answers if a in (200, 201))
    assert granted == 6, answers  # 2.0 / 0.3: six fit, whichever asks first; identical queries run once
    shown = budget(api, world["buyer"], contract)
    assert shown["epsilon_spent"] + shown["epsilon_reserved"] <= 2.0 + 1e-9


@pytest.mark.parametrize(("training", "expected"), [
    ({"features": ["age", "nonexistent"]}, "'nonexistent' is not a column"),
    ({"features": ["patient_id", "age"]}, "is the privacy unit"),
    ({"label": "age", "features": ["age"]}, "is also a feature"),
    ({"epsilon": None}, "needs `training`"),
    ({"command": ["python", "train.py"]}, "no command"),
    ({"image": "analysis"}, "runs in the 'training' image"),
    ({"epochs": 0}, "epochs"),
    ({"delta": 0.5}, "delta"),
])
def test_a_bad_training_spec_is_refused_and_holds_nothing(api: TestClient, world: dict[str, Any],
                                                          training: dict[str, Any], expected: str) -> None:
    contract = world["contract"]()
    response = submit(api, world["buyer"], contract, **training)
    assert response.status_code == 422, response.text
    assert expected in json.dumps(response.json()), response.json()
    shown = budget(api, world["buyer"], contract)
    assert shown["epsilon_reserved"] == 0 and shown["epsilon_spent"] == 0
    assert api.get("/v1/jobs", headers=auth(world["buyer"])).json() == []


def test_a_bundle_without_the_model_module_holds_nothing(api: TestClient, world: dict[str, Any],
                                                        instance: Instance) -> None:
    contract = world["contract"]()
    response = submit(api, world["buyer"], contract, code={"train.py": MODEL})
    assert response.status_code == 422 and "model.py" in response.json()["detail"]
    assert budget(api, world["buyer"], contract)["epsilon_reserved"] == 0
    with instance.read_session() as session:
        assert session.execute(select(Job)).first() is None
        assert session.execute(select(BudgetReservation)).first() is None


def test_pure_dp_contracts_and_contracts_without_dp_training_refuse_it(api: TestClient,
                                                                       world: dict[str, Any]) -> None:
    pure = submit(api, world["buyer"], world["contract"](delta=0.0))
    assert pure.status_code == 422 and "delta" in pure.json()["detail"]
    other = submit(api, world["buyer"], world["contract"](kinds=["analysis", "query"]))
    assert other.status_code == 403, other.text


def test_free_form_training_names_no_epsilon(api: TestClient, world: dict[str, Any]) -> None:
    spec = {"contract": world["contract"](kinds=["training"], tier="aggregate"), "dataset": DATASET,
            "kind": "training", "image": "training", "command": ["python", "fit.py"],
            "training": {"label": "stroke_death_30d", "features": FEATURES, "epsilon": 1.0}}
    response = api.post("/v1/jobs", headers=auth(world["buyer"]), data={"spec": json.dumps(spec)},
                        files={"code": ("code.tar.gz", pack({"fit.py": "print(1)"}), "application/gzip")})
    assert response.status_code == 422 and "only dp_training spends epsilon" in response.text


def test_free_form_training_names_what_the_gate_attacks(api: TestClient, world: dict[str, Any]) -> None:
    spec = {"contract": world["contract"](kinds=["training"], tier="aggregate"), "dataset": DATASET,
            "kind": "training", "image": "training", "command": ["python", "fit.py"]}
    response = api.post("/v1/jobs", headers=auth(world["buyer"]), data={"spec": json.dumps(spec)},
                        files={"code": ("code.tar.gz", pack({"fit.py": "print(1)"}), "application/gzip")})
    assert response.status_code == 422 and "membership-inference gate" in response.text

