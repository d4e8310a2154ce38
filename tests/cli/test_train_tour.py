"""`sandbox train` as the README shows it: a DP MLP on a dp_only contract, followed with its steps and epsilon,
then the signed weights downloaded and checked against the instance's key."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from cli.server import Server, register_registry

pytestmark = pytest.mark.docker

MODEL = """
import torch


def build_model(n_features, n_outputs):
    return torch.nn.Sequential(torch.nn.Linear(n_features, 16), torch.nn.ReLU(), torch.nn.Linear(16, n_outputs))
"""


# The store is not what this tour tests (the API and worker tests run on both stores): SQLite only, to keep
# the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_train_wait_and_download_the_signed_weights(server: Server, tmp_path: Path, training_image: str) -> None:
    steward = server.token("steward", "xuanwu", "dr-li")
    buyer = server.token("buyer", "acme-ai", "alice")
    register_registry(server, steward, tmp_path, procedures=600)
    contract = json.loads(server.cli(
        "contract", "create", "--buyer-org", "acme-ai", "--dataset", "carotid-stenting", "--tier", "dp_only",
        "--kinds", "dp_training", "--epsilon", "2", "--delta", "1e-5", "--valid-until", "2099-12-31",
        "--policy", "dp-only", "--json", token=steward).stdout)
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    trained = None
    for _ in range(60):  # the worker publishes its images shortly after the server starts
        trained = server.cli("train", "--contract", contract["id"], "--dataset", "carotid-stenting",
                             "--model", str(model), "--label", "stroke_death_30d",
                             "--features", "age,sex,symptomatic,stenosis_pct", "--epochs", "2",
                             "--batch-size", "100", "--epsilon", "1", "--wait", token=buyer, check=False)
        if "not available on the workers" not in trained.stderr:
            break
        httpx.get(f"{server.url}/healthz")
    assert trained is not None and trained.returncode == 0, trained.stderr
    assert "epsilon charged:" in trained.stdout and "model/model.safetensors" in trained.stdout
    job_id = trained.stdout.split()[1].rstrip(":")

    budget = json.loads(server.cli("budget", "--json", token=buyer).stdout)
    [row] = [b for b in budget if b["contract"] == contract["id"]]
    assert 0 < row["epsilon_spent"] <= 1 and row["epsilon_reserved"] == 0

    key = tmp_path / "instance.pub.pem"
    key.write_bytes((server.home / "keys" / "signing-ed25519.pub.pem").read_bytes())
    out = tmp_path / "released"
    downloaded = server.cli("job", "download", job_id, "--to", str(out), "--verify-key", str(key), token=buyer)
    assert "verified" in downloaded.stdout
    record = json.loads((out / "model" / "training-record.json").read_text())["record"]
    assert record["job"] == job_id and record["epsilon_charged"] == pytest.approx(row["epsilon_spent"])
    assert (out / "model" / "model.safetensors").stat().st_size > 0
