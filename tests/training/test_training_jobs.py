"""Training on the demo registry as an AI company would, on the real Docker engine and the training image:
a DP MLP on a dp_only contract comes back as signed weights with its epsilon charged; a free-form boosted model
goes through the membership-inference gate to the steward; an overfit model is blocked with the reason named;
and code that grabs the rows before the trainer makes the run fail and pay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from jobworld import JobWorld, pack

from runners.docker import DockerRunner
from sandbox.instance import Instance
from sandbox.release.verify import verify_signed
from sandbox.worker import Capacity, Worker

pytestmark = pytest.mark.docker

DATASET = "carotid-stenting"
FEATURES = ["age", "sex", "symptomatic", "stenosis_pct", "embolic_protection"]
MLP = """
import torch


def build_model(n_features, n_outputs):
    return torch.nn.Sequential(torch.nn.Linear(n_features, 32), torch.nn.ReLU(), torch.nn.Linear(32, n_outputs))
"""
FIT = """
import pandas as pd
import skops.io as sio
from sklearn.{module} import {estimator}

frame = pd.read_parquet("/data/carotid-stenting.parquet")
X = frame[["age", "stenosis_pct", "length_of_stay"]].to_numpy(dtype=float)
y = frame["stroke_death_30d"].astype(int).to_numpy()
model = {estimator}({arguments}).fit(X, y)
sio.dump(model, "/output/model.skops")
print("fitted on", len(frame), "rows")
"""


class World(JobWorld):
    """A job world on the training image, whose contracts each test writes for its tier and kinds."""

    def add_contract(self, tier: str, kinds: list[str], **extra: Any) -> str:
        response = self.api.post("/v1/contracts", headers=auth(self.steward), json={
            "buyer_org": "acme", "datasets": [DATASET], "tier": tier, "kinds": kinds, "purpose": "stroke risk",
            "valid_until": "2099-01-01", "epsilon": 3.0, "delta": 1e-5,
            "quotas": {"concurrent_jobs": 2, "cpu_hours": 10}, **extra})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def submit_spec(self, spec: dict[str, Any], code: dict[str, str]) -> str:
        spec = {"dataset": DATASET, "resources": {"cpus": 2, "memory_mb": 2048, "timeout_s": 300}, **spec}
        response = self.api.post("/v1/jobs", headers=auth(self.buyer), data={"spec": json.dumps(spec)},
                                 files={"code": ("code.tar.gz", pack(code), "application/gzip")})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def fit(self, module: str, estimator: str, arguments: str) -> Any:
        """A free-form training job that fits `estimator` on three columns and writes it as skops; settled."""
        job_id = self.submit_spec({
            "contract": self.add_contract("aggregate", ["training"]), "kind": "training", "image": "training",
            "command": ["python", "fit.py"],
            "training": {"label": "stroke_death_30d", "features": ["age", "stenosis_pct", "length_of_stay"]}},
            {"fit.py": FIT.format(module=module, estimator=estimator, arguments=arguments)})
        return self.run_until(job_id, {"done", "in_review", "failed"}, timeout=300)

    def budget(self, contract: str) -> dict[str, Any]:
        rows = self.api.get("/v1/budgets", headers=auth(self.buyer)).json()
        return next(row for row in rows if row["contract"] == contract)


@pytest.fixture
def database_url() -> None:
    """SQLite only: these runs exercise containers and the trainer, which do not depend on the store. The
    ledger's behaviour on PostgreSQL is tested in test_training_submit.py and test_training_restart.py."""
    return None


@pytest.fixture
def world(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path, training_image: str) -> Iterator[World]:
    steward = tokens.steward(org="hospital")
    register_demo(api, steward, tmp_path, procedures=1200)
    runner = DockerRunner(state_dir=tmp_path / "runner", instance_id=instance.instance_id)
    worker = Worker(instance, runner, Capacity(cpus=4, memory_mb=8192))
    worker.refresh_images()
    built = World(api=api, instance=instance, worker=worker, runner=runner, steward=steward,
                  buyer=tokens.buyer(org="acme"), contract="")
    yield built
    built.tear_down()


def outputs_of(job: dict[str, Any]) -> dict[str, Any]:
    return {o["path"]: o for o in job["outputs"]}


def test_a_dp_mlp_on_a_dp_only_contract_comes_back_signed_with_its_epsilon_charged(world: World) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load

    contract = world.add_contract("dp_only", ["dp_training"], policy="dp-only")
    job_id = world.submit_spec({"contract": contract, "kind": "dp_training", "training": {
        "label": "stroke_death_30d", "features": FEATURES, "epochs": 2, "batch_size": 128, "learning_rate": 0.5,
        "max_grad_norm": 1.0, "epsilon": 1.0}}, {"model.py": MLP})
    assert world.budget(contract)["epsilon_reserved"] == pytest.approx(1.0)
    job = world.run_until(job_id, {"done", "in_review", "failed"}, timeout=300)
    outputs = outputs_of(job)
    assert outputs["model/model.safetensors"]["status"] == "released", outputs
    assert outputs["model/training-record.json"]["status"] == "released"
    assert job["training"]["progress"]["step"] == job["training"]["progress"]["steps"] > 0

    buyer = auth(world.buyer)
    weights = world.api.get(f"/v1/jobs/{job_id}/outputs/model/model.safetensors", headers=buyer)
    signed = world.api.get(f"/v1/jobs/{job_id}/outputs/model/training-record.json", headers=buyer).json()
    record = verify_signed(signed, world.instance.settings.verify_key_path.read_bytes(), body="record",
                           what="training record")
    assert record["job"] == job_id and record["dataset"] == DATASET and record["accountant"] == "rdp"
    assert 0 < record["epsilon"] <= 1.0 and record["delta"] == pytest.approx(1e-6)
    assert record["noise_multiplier"] > 0 and record["steps"] >= 2 and record["max_grad_norm"] == 1.0
    import hashlib

    assert record["weights_sha256"] == hashlib.sha256(weights.content).hexdigest()
    tampered = {**signed, "record": {**signed["record"], "epsilon": 0.01}}
    with pytest.raises(Exception, match="does not verify"):
        verify_signed(tampered, world.instance.settings.verify_key_path.read_bytes(), body="record",
                      what="training record")

    # The buyer's own build_model takes the weights as they are.
    namespace: dict[str, Any] = {}
    exec(compile(MLP, "model.py", "exec"), namespace)  # noqa: S102 - the buyer's own file, on their machine
    plan = job["training"]["plan"]
    model = namespace["build_model"](plan["n_features"], plan["n_outputs"])
    model.load_state_dict(load(weights.content))
    assert model(torch.zeros(3, plan["n_features"])).shape == (3, 2)

    shown = world.budget(contract)
    assert shown["epsilon_reserved"] == 0
    assert shown["epsilon_spent"] == pytest.approx(record["epsilon_charged"])
    assert record["epsilon"] <= record["epsilon_charged"] <= 1.0


def test_a_free_form_boosted_model_reaches_the_steward_with_the_gate_report(world: World) -> None:
    job = world.fit("ensemble", "GradientBoostingClassifier", "n_estimators=30, max_depth=2, random_state=0")
    job_id = job["id"]
    model = outputs_of(job)["model.skops"]
    assert model["status"] == "in_review", json.dumps(model["checks"], indent=1)
    gate = [c for c in model["checks"] if c["rule"] == "membership-inference"]
    assert gate and gate[0]["verdict"] == "pass" and "AUC" in gate[0]["reason"], model["checks"]
    assert job["training"]["split"]["holdout_rows"] > 0
    report = job["training"]["gate"]["model.skops"]
    assert report["attacks"] and report["per_record_risk"]["n_records"] > 0
    assert world.api.get(f"/v1/jobs/{job_id}/outputs/model.skops", headers=auth(world.buyer)).status_code != 200

    queue = world.api.get("/v1/reviews", headers=auth(world.steward)).json()
    assert any(entry["id"] == job_id for entry in queue)
    decided = world.api.post(f"/v1/reviews/{job_id}/decisions", headers=auth(world.steward),
                             json={"release": ["model.skops"], "reject": [], "comment": "gate passed"})
    assert decided.status_code == 200, decided.text
    download = world.api.get(f"/v1/jobs/{job_id}/outputs/model.skops", headers=auth(world.buyer))
    assert download.status_code == 200
    import skops.io as sio

    fitted = sio.loads(download.content, trusted=sio.get_untrusted_types(data=download.content))
    assert hasattr(fitted, "predict_proba")


def test_an_overfit_model_is_blocked_with_the_reason_named(world: World) -> None:
    job = world.fit("neighbors", "KNeighborsClassifier", "n_neighbors=1")
    job_id = job["id"]
    model = outputs_of(job)["model.skops"]
    assert model["status"] == "blocked", model
    blocking = [c for c in model["checks"] if c["verdict"] == "block"]
    assert any(c["rule"] == "model-weights" and "row" in c["reason"] for c in blocking), blocking
    decided = world.api.post(f"/v1/reviews/{job_id}/decisions", headers=auth(world.steward),
                             json={"release": ["model.skops"], "reject": [], "comment": "try"})
    assert decided.status_code in (409, 422), decided.text


def test_code_that_takes_the_rows_first_fails_the_run_and_pays_for_it(world: World) -> None:
    grab = MLP + """
import http.client, socket


class _Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect("/run/sandbox/dp.sock")


connection = _Unix("local")
connection.request("POST", "/training/data", body=b"{}", headers={"Content-Length": "2"})
stolen = connection.getresponse().read()
print("STOLEN", stolen[:64].hex())
"""
    contract = world.add_contract("dp_only", ["dp_training"], policy="dp-only")
    job_id = world.submit_spec({"contract": contract, "kind": "dp_training", "training": {
        "label": "stroke_death_30d", "features": FEATURES, "epochs": 1, "batch_size": 128, "epsilon": 0.5}},
        {"model.py": grab})
    job = world.run_until(job_id, {"done", "in_review", "failed"}, timeout=300)
    outputs = outputs_of(job)
    assert "model/model.safetensors" not in outputs
    assert outputs["model/refused"]["status"] == "blocked"
    logs = world.api.get(f"/v1/jobs/{job_id}/logs", headers=auth(world.steward)).text
    assert "STOLEN" not in logs
    shown = world.budget(contract)
    assert shown["epsilon_reserved"] == 0 and shown["epsilon_spent"] == pytest.approx(0.5)


def test_a_run_cancelled_before_it_starts_gives_its_epsilon_back(world: World) -> None:
    contract = world.add_contract("dp_only", ["dp_training"], policy="dp-only")
    job_id = world.submit_spec({"contract": contract, "kind": "dp_training", "training": {
        "label": "stroke_death_30d", "features": FEATURES, "epsilon": 0.5}}, {"model.py": MLP})
    cancelled = world.api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(world.buyer))
    assert cancelled.status_code == 200, cancelled.text
    world.worker.tick()
    shown = world.budget(contract)
    assert shown["epsilon_reserved"] == 0 and shown["epsilon_spent"] == 0
    assert world.job(job_id)["training"]["epsilon_charged"] == 0


def test_a_dp_regression_on_a_bounded_number_trains_too(world: World) -> None:
    contract = world.add_contract("aggregate", ["dp_training"])
    job_id = world.submit_spec({"contract": contract, "kind": "dp_training", "training": {
        "label": "length_of_stay", "features": ["age", "symptomatic", "stroke_death_30d"], "epochs": 1,
        "batch_size": 200, "epsilon": 0.5}}, {"model.py": MLP})
    job = world.run_until(job_id, {"done", "in_review", "failed"}, timeout=300)
    assert job["training"]["plan"]["task"] == "regression" and job["training"]["plan"]["n_outputs"] == 1
    outputs = outputs_of(job)
    assert outputs["model/model.safetensors"]["status"] == "released", outputs
    assert 0 < job["training"]["epsilon_charged"] <= 0.5


def test_a_model_refused_on_its_graph_is_named_and_costs_nothing(world: World) -> None:
    batch_norm = MLP.replace("torch.nn.ReLU()", "torch.nn.BatchNorm1d(32), torch.nn.ReLU()")
    contract = world.add_contract("dp_only", ["dp_training"], policy="dp-only")
    job_id = world.submit_spec({"contract": contract, "kind": "dp_training", "training": {
        "label": "stroke_death_30d", "features": FEATURES, "epochs": 1, "epsilon": 0.5}}, {"model.py": batch_norm})
    job = world.run_until(job_id, {"done", "in_review", "failed"}, timeout=300)
    refused = outputs_of(job)["model/refused"]
    assert refused["status"] == "blocked" and "refused" in refused["checks"][0]["reason"], refused
    logs = world.api.get(f"/v1/reviews/{job_id}/files/logs/stdout.txt", headers=auth(world.steward)).text + \
        world.api.get(f"/v1/reviews/{job_id}/files/logs/stderr.txt", headers=auth(world.steward)).text
    assert "batch_norm" in logs or "batch norm" in logs.lower(), logs
    shown = world.budget(contract)
    assert shown["epsilon_reserved"] == 0 and shown["epsilon_spent"] == 0
