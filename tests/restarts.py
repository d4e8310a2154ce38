"""A `sandbox serve` killed with SIGKILL while a job runs, then started again (helpers for restart tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
from cli.server import base_env, free_port, start, stop
from jobworld import pack

from sandbox.demo import CARD, write_registry


@dataclass
class Restarted:
    url: str
    steward: dict[str, str]
    buyer: dict[str, str]
    contract: dict[str, Any]
    job: dict[str, Any]  # as the restarted service settled it (no longer running)
    instance_label: str


@contextmanager
def killed_mid_job(tmp_path: Path, database_url: str | None, *, procedures: int, contract: dict[str, Any],
                   spec: dict[str, Any], code: dict[str, str], submit_s: float, finish_s: float) -> Iterator[Restarted]:
    """Register the demo registry and `contract`, submit `spec` with `code`, SIGKILL the service once the job
    runs, start it again and wait until the job has left `running`; the service stops and the instance's
    containers go when the block ends."""
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
        data = write_registry(tmp_path / "registry.parquet", procedures=procedures)
        with data.open("rb") as handle:
            assert httpx.post(f"{url}/v1/datasets/carotid-stenting/versions", headers=steward,
                              files={"file": ("r.parquet", handle)}).status_code == 201
        created = httpx.post(f"{url}/v1/contracts", headers=steward, json={
            "buyer_org": "acme", "datasets": ["carotid-stenting"], "purpose": "restart",
            "valid_until": "2099-01-01", **contract}).json()
        spec = {**spec, "contract": created["id"], "dataset": "carotid-stenting"}
        deadline = time.monotonic() + submit_s
        while True:  # the embedded worker publishes the image list when it starts
            submitted = httpx.post(f"{url}/v1/jobs", headers=buyer, data={"spec": json.dumps(spec)},
                                   files={"code": ("c.tar.gz", pack(code), "application/gzip")})
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
        [container] = docker.from_env().containers.list(filters={"label": f"org.sandbox.job={job_id}"})
        instance_label = container.labels["org.sandbox.instance"]

        server = start(env, port)
        deadline = time.monotonic() + finish_s
        while (job := httpx.get(f"{url}/v1/jobs/{job_id}", headers=steward).json())["state"] == "running":
            assert time.monotonic() < deadline, "the restarted service did not pick the job up"
            time.sleep(0.3)
        yield Restarted(url=url, steward=steward, buyer=buyer, contract=created, job=job,
                        instance_label=instance_label)
    finally:
        stop(server)
        if instance_label:
            for leftover in docker.from_env().containers.list(
                    all=True, filters={"label": f"org.sandbox.instance={instance_label}"}):
                leftover.remove(force=True)
