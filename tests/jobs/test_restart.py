"""A service killed with SIGKILL mid-job picks the job up again on restart, and the result arrives."""

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

SLOW_JOB = """
import time, pandas as pd
time.sleep(4)
pd.read_parquet('/data/carotid-stenting.parquet').groupby('sex').size().to_csv('/output/by_sex.csv')
print('finished after the restart')
"""


def test_sigkill_mid_job_then_restart_delivers_the_result(tmp_path: Path, database_url: str | None,
                                                          analysis_image: str) -> None:
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
        data = write_registry(tmp_path / "registry.parquet", procedures=200)
        with data.open("rb") as handle:
            assert httpx.post(f"{url}/v1/datasets/carotid-stenting/versions", headers=steward,
                              files={"file": ("r.parquet", handle)}).status_code == 201
        contract = httpx.post(f"{url}/v1/contracts", headers=steward, json={
            "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
            "purpose": "restart", "valid_until": "2099-01-01", "epsilon": 1.0}).json()
        spec = {"contract": contract["id"], "dataset": "carotid-stenting", "command": ["python3", "main.py"],
                "resources": {"cpus": 1, "memory_mb": 512, "timeout_s": 120}}
        deadline = time.monotonic() + 60
        while True:  # the embedded worker publishes the image list when it starts
            submitted = httpx.post(f"{url}/v1/jobs", headers=buyer, data={"spec": json.dumps(spec)},
                                   files={"code": ("c.tar.gz", pack({"main.py": SLOW_JOB}), "application/gzip")})
            if submitted.status_code == 201 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]
        while httpx.get(f"{url}/v1/jobs/{job_id}", headers=buyer).json()["state"] != "running":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.2)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        client = docker.from_env()
        [container] = client.containers.list(filters={"label": f"org.sandbox.job={job_id}"})
        instance_label = container.labels["org.sandbox.instance"]

        server = start(env, port)
        deadline = time.monotonic() + 90
        while (job := httpx.get(f"{url}/v1/jobs/{job_id}", headers=steward).json())["state"] == "running":
            assert time.monotonic() < deadline, "the restarted service did not pick the job up"
            time.sleep(0.3)
        assert job["state"] in ("in_review", "done") and job["exit_code"] == 0, job
        assert {o["path"] for o in job["outputs"]} >= {"by_sex.csv", "logs/stdout.txt"}
        log = httpx.get(f"{url}/v1/reviews/{job_id}/files/logs/stdout.txt", headers=steward).text
        assert "finished after the restart" in log
        assert not client.containers.list(all=True, filters={"label": f"org.sandbox.instance={instance_label}"})
    finally:
        stop(server)
        if instance_label:
            for leftover in docker.from_env().containers.list(
                    all=True, filters={"label": f"org.sandbox.instance={instance_label}"}):
                leftover.remove(force=True)
