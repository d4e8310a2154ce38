"""A service killed with SIGKILL during a DP training run: the restarted one hands the trainer its rows, keeps the
run's reservation (it belongs to the job, not to the dead process), releases the model and charges it once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import httpx
import pytest
from cli.server import base_env, free_port, start, stop
from jobworld import pack

from sandbox.demo import CARD, write_registry

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SLOW_MODEL = """
import time
import torch

time.sleep(6)  # the service is killed while the buyer's module is still being imported


def build_model(n_features, n_outputs):
    return torch.nn.Sequential(torch.nn.Linear(n_features, 8), torch.nn.ReLU(), torch.nn.Linear(8, n_outputs))
"""


def test_sigkill_mid_run_then_restart_releases_the_model_and_charges_once(
        tmp_path: Path, database_url: str | None, training_image: str) -> None:
    env = base_env(tmp_path / "home", database_url)
    cli = [sys.executable, "-m", "sandbox.cli"]
    subprocess.run([*cli, "init"], env=env, check=True, capture_output=True)

    def token(role: str, org: str) -> dict[str, str]:
        issued = subprocess.run([*cli, "token", "issue", "--sub", role, "--org", org, "--role", role], env=env,
                                check=True, capture_output=True, text=True).stdout.strip()
        return {"Authorization": f"Bearer {issued}"}

    steward, buyer = token("steward", "hospital"), token("buyer", "acme")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(env, port)
    instance_label = None
    try:
        assert httpx.post(f"{url}/v1/datasets", json=CARD, headers=steward).status_code == 201
        data = write_registry(tmp_path / "registry.parquet", procedures=400)
        with data.open("rb") as handle:
            assert httpx.post(f"{url}/v1/datasets/carotid-stenting/versions", headers=steward,
                              files={"file": ("r.parquet", handle)}).status_code == 201
        contract = httpx.post(f"{url}/v1/contracts", headers=steward, json={
            "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "dp_only", "kinds": ["dp_training"],
            "purpose": "restart", "valid_until": "2099-01-01", "epsilon": 2.0, "delta": 1e-5,
            "policy": "dp-only"}).json()
        spec = {"contract": contract["id"], "dataset": "carotid-stenting", "kind": "dp_training",
                "training": {"label": "stroke_death_30d", "features": ["age", "sex", "symptomatic"], "epochs": 2,
                             "batch_size": 64, "epsilon": 1.0},
                "resources": {"cpus": 1, "memory_mb": 2048, "timeout_s": 600}}
        deadline = time.monotonic() + 120
        while True:  # the embedded worker publishes the image list when it starts
            submitted = httpx.post(f"{url}/v1/jobs", headers=buyer, data={"spec": json.dumps(spec)},
                                   files={"code": ("c.tar.gz", pack({"model.py": SLOW_MODEL}), "application/gzip")})
            if submitted.status_code == 201 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]
        while httpx.get(f"{url}/v1/jobs/{job_id}", headers=buyer).json()["state"] != "running":
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        client = docker.from_env()
        [container] = client.containers.list(filters={"label": f"org.sandbox.job={job_id}"})
        instance_label = container.labels["org.sandbox.instance"]

        server = start(env, port)
        deadline = time.monotonic() + 180
        while (job := httpx.get(f"{url}/v1/jobs/{job_id}", headers=steward).json())["state"] == "running":
            assert time.monotonic() < deadline, "the restarted service did not pick the run up"
            time.sleep(0.3)
        outputs = {o["path"]: o for o in job["outputs"]}
        assert job["state"] in ("in_review", "done") and job["exit_code"] == 0, job
        assert outputs["model/model.safetensors"]["status"] == "released", outputs
        [budget] = [b for b in httpx.get(f"{url}/v1/budgets", headers=buyer).json()
                    if b["contract"] == contract["id"]]
        assert budget["epsilon_reserved"] == 0
        assert budget["epsilon_spent"] == pytest.approx(job["training"]["epsilon_charged"])
        assert 0 < budget["epsilon_spent"] <= 1.0
    finally:
        stop(server)
        if instance_label:
            for leftover in docker.from_env().containers.list(
                    all=True, filters={"label": f"org.sandbox.instance={instance_label}"}):
                leftover.remove(force=True)
