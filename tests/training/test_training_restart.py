"""A service killed with SIGKILL during a DP training run: the restarted one hands the trainer its rows, keeps the
run's reservation (it belongs to the job, not to the dead process), releases the model and charges it once."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from restarts import killed_mid_job

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SLOW_MODEL = """
import time
import torch

time.sleep(6)  # the service is killed while the buyer's module is still being imported


def build_model(n_features, n_outputs):
    return torch.nn.Sequential(torch.nn.Linear(n_features, 8), torch.nn.ReLU(), torch.nn.Linear(8, n_outputs))
"""


# A leader killed mid-job on PostgreSQL is tests/scale/test_leader.py's; here the trainer's restart: SQLite only.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigkill_mid_run_then_restart_releases_the_model_and_charges_once(
        tmp_path: Path, database_url: str | None, training_image: str) -> None:
    with killed_mid_job(tmp_path, database_url, procedures=400,
                        contract={"tier": "dp_only", "kinds": ["dp_training"], "epsilon": 2.0, "delta": 1e-5,
                                  "policy": "dp-only"},
                        spec={"kind": "dp_training",
                              "training": {"label": "stroke_death_30d", "features": ["age", "sex", "symptomatic"],
                                           "epochs": 2, "batch_size": 64, "epsilon": 1.0},
                              "resources": {"cpus": 1, "memory_mb": 2048, "timeout_s": 600}},
                        code={"model.py": SLOW_MODEL}, submit_s=120, finish_s=180) as run:
        job = run.job
        outputs = {o["path"]: o for o in job["outputs"]}
        assert job["state"] in ("in_review", "done") and job["exit_code"] == 0, \
            f"{job['state']} (exit {job['exit_code']}): {job['reason']}"
        assert outputs["model/model.safetensors"]["status"] == "released", outputs
        [budget] = [b for b in httpx.get(f"{run.url}/v1/budgets", headers=run.buyer).json()
                    if b["contract"] == run.contract["id"]]
        assert budget["epsilon_reserved"] == 0
        assert budget["epsilon_spent"] == pytest.approx(job["training"]["epsilon_charged"])
        assert 0 < budget["epsilon_spent"] <= 1.0
