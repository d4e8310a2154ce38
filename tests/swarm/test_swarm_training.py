"""Training on the Swarm runner, on the 3-node lab, as on one machine (tests/training/test_training_jobs.py):
a DP MLP comes back as signed weights with its epsilon charged, and a model the trainer refuses on its graph
is withheld, named, and costs nothing.

The training image is 2.1 GB, so training lands on ONE node, as it would in a hospital: the GPU node. Each job
asks for a GPU, reserved as the generic resource NVIDIA-GPU that only that node advertises (a fake one in the
lab: the trainer finds no CUDA and trains on the CPU). Only that node pulls the image; the manager holds it
too, since its engine pushed it. A DP training container has no /data (its rows come through the DP socket),
so data locality cannot be what places it.

Docker 20.10's swarm rejects a task holding a node's generic resource ("assigned node no longer meets
constraints") whenever that node's spec is updated while it runs, a label added for instance (seen in the lab):
nothing may update the GPU node while these tests run, as another session on the same lab might.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from jobworld import JobWorld, pack, training_image  # noqa: F401 - the session fixture this module uses

from runners.base import LABEL_INSTANCE, LABEL_JOB
from runners.registry import RegistryImages
from runners.swarm import LABEL_NODE, SwarmRunner
from runners.swarm_lab import SwarmLab
from sandbox.instance import Instance
from sandbox.release.verify import verify_signed
from sandbox.worker import Capacity, Worker

pytestmark = pytest.mark.docker

DATASET = "carotid-stenting"
FEATURES = ["age", "sex", "symptomatic", "stenosis_pct", "embolic_protection"]
MLP = """
import torch


def build_model(n_features, n_outputs):
    return torch.nn.Sequential(torch.nn.Linear(n_features, 16), torch.nn.ReLU(), torch.nn.Linear(16, n_outputs))
"""
# A model the trainer refuses on its graph (batch norm mixes patients' rows within a batch: no per-sample DP).
BATCH_NORM = MLP.replace("torch.nn.ReLU()", "torch.nn.BatchNorm1d(16), torch.nn.ReLU()")
WAIT_S = 300.0


@pytest.fixture
def database_url() -> None:
    """SQLite only: the store is not what these tests are about, and training on the swarm is the slow part."""
    return None


def lab_engine(url: str) -> Any:
    return docker.DockerClient(base_url=url, timeout=120)


@pytest.fixture(scope="module")
def training_node(swarm_lab: SwarmLab, lab_images: RegistryImages, training_image: str) -> str:  # noqa: F811
    """The GPU node, where every training task lands; the image pushed, and pulled there, outside any job's time."""
    started = time.monotonic()
    reference = lab_images.reference(training_image)  # cold: moved to the manager and pushed; warm: a check
    published = time.monotonic() - started
    node = next(node for node in swarm_lab.nodes if node.gpus)
    client = lab_engine(node.engine_url)
    started = time.monotonic()
    try:
        client.api.inspect_image(reference)
    except docker.errors.ImageNotFound:
        client.api.pull(reference)
    finally:
        client.close()
    print(f"\ntraining image: published in {published:.1f} s, on {node.name} in {time.monotonic() - started:.1f} s")
    return node.name


@dataclass
class World(JobWorld):
    """A worker with the Swarm runner on the lab, and the nodes its training tasks ran on."""

    lab: SwarmLab | None = None
    manager: Any = None
    nodes_seen: set[str] = field(default_factory=set)

    def add_contract(self, tier: str, kinds: list[str], **extra: Any) -> str:
        response = self.api.post("/v1/contracts", headers=auth(self.steward), json={
            "buyer_org": "acme", "datasets": [DATASET], "tier": tier, "kinds": kinds, "purpose": "stroke risk",
            "valid_until": "2099-01-01", "epsilon": 3.0, "delta": 1e-5,
            "quotas": {"concurrent_jobs": 2, "cpu_hours": 10, "gpu_hours": 1}, **extra})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def submit_training(self, contract: str, training: dict[str, Any], code: dict[str, str]) -> str:
        spec = {"dataset": DATASET, "contract": contract, "kind": "dp_training", "training": training,
                "resources": {"cpus": 1, "memory_mb": 2048, "timeout_s": 300, "gpus": 1}}
        response = self.api.post("/v1/jobs", headers=auth(self.buyer), data={"spec": json.dumps(spec)},
                                 files={"code": ("code.tar.gz", pack(code), "application/gzip")})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def run_until(self, job_id: str, states: set[str], timeout: float = WAIT_S) -> Any:
        """Tick the worker until the job is in `states`, noting the node of every task the job's services ran."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.worker.tick()
            for task in self.manager.api.tasks(filters={"label": f"{LABEL_JOB}={job_id}"}):
                if task.get("NodeID"):
                    labels = self.manager.api.inspect_node(task["NodeID"])["Spec"].get("Labels") or {}
                    self.nodes_seen.add(str(labels.get(LABEL_NODE)))
            job = self.job(job_id)
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} stayed {self.job(job_id)['state']}, wanted {states}")

    def budget(self, contract: str) -> dict[str, Any]:
        rows = self.api.get("/v1/budgets", headers=auth(self.buyer)).json()
        return next(row for row in rows if row["contract"] == contract)

    def leftovers(self) -> list[str]:
        """This instance's services, networks and task containers anywhere on the lab."""
        assert self.lab is not None
        label = f"{LABEL_INSTANCE}={self.instance.instance_id}"
        found = [f"service {s['Spec']['Name']}" for s in self.manager.api.services(filters={"label": label})]
        for node in self.lab.nodes:
            client = lab_engine(node.engine_url)
            try:
                found += [f"network {n['Name']} on {node.name}" for n in client.api.networks(filters={"label": label})]
                found += [f"container {c['Names'][0]} on {node.name}"
                          for c in client.api.containers(all=True, filters={"label": label})]
            finally:
                client.close()
        return found


@pytest.fixture
def world(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path, swarm_lab: SwarmLab,
          lab_images: RegistryImages, training_node: str) -> Iterator[World]:
    steward = tokens.steward(org="hospital")
    register_demo(api, steward, tmp_path, procedures=1200)
    manager = lab_engine(swarm_lab.manager_url)
    engines = {node.name: lab_engine(node.engine_url) for node in swarm_lab.nodes}
    runner = SwarmRunner(manager, state_dir=tmp_path / "runner", instance_id=instance.instance_id, images=lab_images,
                         node_engines=engines)
    worker = Worker(instance, runner, Capacity(cpus=4, memory_mb=8192, gpus=1))
    worker.publish_worker()  # the API admits a GPU job only when a live worker has a GPU
    worker.refresh_images()
    built = World(api=api, instance=instance, worker=worker, runner=runner,  # type: ignore[arg-type]
                  steward=steward, buyer=tokens.buyer(org="acme"), contract="", lab=swarm_lab, manager=manager)
    yield built
    for job_id in runner.managed_jobs():
        runner.terminate(job_id)
        runner.cleanup(job_id)
    deadline = time.monotonic() + 60
    while built.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not built.leftovers(), f"left on the swarm: {built.leftovers()}"
    built.tear_down()  # and nothing of the instance on the host engine either
    for client in [manager, *engines.values()]:
        client.close()


def outputs_of(job: dict[str, Any]) -> dict[str, Any]:
    return {o["path"]: o for o in job["outputs"]}


def test_a_dp_model_trained_on_the_swarm_comes_back_signed_with_its_epsilon_charged(world: World,
                                                                                    training_node: str) -> None:
    contract = world.add_contract("aggregate", ["dp_training"])  # the default policy: up to one GPU
    job_id = world.submit_training(contract, {"label": "stroke_death_30d", "features": FEATURES, "epochs": 1,
                                              "batch_size": 128, "learning_rate": 0.5, "max_grad_norm": 1.0,
                                              "epsilon": 1.0}, {"model.py": MLP})
    assert world.budget(contract)["epsilon_reserved"] == pytest.approx(1.0)
    job = world.run_until(job_id, {"done", "in_review", "failed"})
    assert world.nodes_seen == {training_node}, f"training ran on {world.nodes_seen}, not only {training_node}"
    outputs = {path: output["status"] for path, output in outputs_of(job).items()}
    released = {"model/model.safetensors": "released", "model/training-record.json": "released"}
    assert released.items() <= outputs.items(), f"job {job['state']} ({job.get('reason')}): {outputs}"

    buyer = auth(world.buyer)
    weights = world.api.get(f"/v1/jobs/{job_id}/outputs/model/model.safetensors", headers=buyer)
    signed = world.api.get(f"/v1/jobs/{job_id}/outputs/model/training-record.json", headers=buyer).json()
    record = verify_signed(signed, world.instance.settings.verify_key_path.read_bytes(), body="record",
                           what="training record")
    assert record["job"] == job_id and record["weights_sha256"] == hashlib.sha256(weights.content).hexdigest()
    assert 0 < record["epsilon"] <= record["epsilon_charged"] <= 1.0
    shown = world.budget(contract)
    assert shown["epsilon_reserved"] == 0 and shown["epsilon_spent"] == pytest.approx(record["epsilon_charged"])
    assert job["usage"]["cpu_seconds"] > 0, "the run's CPU time was metered through its node's engine"


def test_a_model_refused_on_its_graph_is_withheld_and_costs_nothing(world: World, training_node: str) -> None:
    contract = world.add_contract("aggregate", ["dp_training"])
    job_id = world.submit_training(contract, {"label": "stroke_death_30d", "features": FEATURES, "epochs": 1,
                                              "epsilon": 0.5}, {"model.py": BATCH_NORM})
    job = world.run_until(job_id, {"done", "in_review", "failed"})
    assert world.nodes_seen == {training_node}, f"training ran on {world.nodes_seen}, not only {training_node}"
    outputs = outputs_of(job)
    assert "model/model.safetensors" not in outputs, "weights came back from a refused model"
    refused = outputs["model/refused"]
    assert refused["status"] == "blocked" and "refused" in refused["checks"][0]["reason"], refused
    logs = world.api.get(f"/v1/reviews/{job_id}/files/logs/stdout.txt", headers=auth(world.steward)).text + \
        world.api.get(f"/v1/reviews/{job_id}/files/logs/stderr.txt", headers=auth(world.steward)).text
    assert "batch_norm" in logs or "batch norm" in logs.lower(), f"the refusal is not named in the logs: {logs}"
    shown = world.budget(contract)
    assert shown["epsilon_reserved"] == 0 and shown["epsilon_spent"] == 0
