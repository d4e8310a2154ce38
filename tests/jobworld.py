"""A real worker on the real Docker engine, driven tick by tick from the test (fixtures and helpers)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo

from runners.base import LABEL_INSTANCE
from runners.docker import DockerRunner
from runners.images import build_images
from sandbox.instance import Instance
from sandbox.worker import Capacity, Worker

REPO = Path(__file__).resolve().parents[2]


def docker_client() -> Any:
    try:
        client = docker.from_env()
        client.ping()
        return client
    except Exception as exc:
        if os.environ.get("SANDBOX_REQUIRE_DOCKER") == "1":
            pytest.fail(f"Docker is required but unreachable: {exc}")
        pytest.skip(f"no Docker engine: {exc}")


def built_image(name: str) -> str:
    """A job image's id, built (offline, from the cache when unchanged) if the engine lacks it."""
    docker_client()
    cache = Path(os.environ.get("SANDBOX_WHEEL_CACHE", REPO / ".cache" / "wheels"))
    return build_images([name], base_image=None, wheel_cache=cache, rebuild=False, progress=lambda *_: None)[name]


@pytest.fixture(scope="session")
def analysis_image() -> str:
    return built_image("analysis")


@pytest.fixture(scope="session")
def training_image() -> str:
    """The training image (built from the analysis image, which comes along)."""
    return built_image("training")


def pack(files: dict[str, str] | dict[str, bytes]) -> bytes:
    """A code bundle (tar.gz) of `files`, text or bytes, as a client would send it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class JobWorld:
    api: TestClient
    instance: Instance
    worker: Worker
    runner: DockerRunner
    steward: str
    buyer: str
    contract: str

    def submit(self, code: dict[str, str], command: list[str], *, contract: str | None = None,
               resources: dict[str, Any] | None = None, token: str | None = None, expect: int = 201) -> Any:
        spec = {"contract": contract or self.contract, "dataset": "carotid-stenting", "image": "analysis",
                "command": command, "resources": resources or {"cpus": 1, "memory_mb": 256, "timeout_s": 60}}
        response = self.api.post("/v1/jobs", headers=auth(token or self.buyer),
                                 files={"code": ("code.tar.gz", pack(code), "application/gzip")},
                                 data={"spec": json.dumps(spec)})
        assert response.status_code == expect, response.text
        return response.json()

    def job(self, job_id: str, token: str | None = None) -> Any:
        response = self.api.get(f"/v1/jobs/{job_id}", headers=auth(token or self.steward))
        assert response.status_code == 200, response.text
        return response.json()

    def run_until(self, job_id: str, states: set[str], timeout: float = 90) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.worker.tick()
            job = self.job(job_id)
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} stayed {self.job(job_id)['state']}, wanted {states}")

    def review_text(self, job_id: str, path: str) -> str:
        response = self.api.get(f"/v1/reviews/{job_id}/files/{path}", headers=auth(self.steward))
        assert response.status_code == 200, response.text
        return response.text

    def containers(self) -> list[Any]:
        label = f"{LABEL_INSTANCE}={self.instance.instance_id}"
        return docker_client().containers.list(all=True, filters={"label": label})

    def tear_down(self) -> None:
        """Remove what the runner made; fail if anything of the instance was left behind."""
        for job_id in self.runner.managed_jobs():
            self.runner.terminate(job_id)
            self.runner.cleanup(job_id)
        left = self.containers()
        for container in left:
            container.remove(force=True)
        assert not left, f"containers left behind: {[c.name for c in left]}"


@pytest.fixture
def job_world(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path,
              analysis_image: str) -> Iterator[JobWorld]:
    steward = tokens.steward(org="hospital")
    register_demo(api, steward, tmp_path, procedures=300)
    contract = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
        "purpose": "jobs", "valid_until": "2099-01-01", "epsilon": 1.0,
        "quotas": {"concurrent_jobs": 4, "cpu_hours": 10}})
    assert contract.status_code == 201, contract.text
    runner = DockerRunner(state_dir=tmp_path / "runner", instance_id=instance.instance_id)
    worker = Worker(instance, runner, Capacity(cpus=4, memory_mb=4096))
    worker.refresh_images()
    world = JobWorld(api=api, instance=instance, worker=worker, runner=runner, steward=steward,
                     buyer=tokens.buyer(org="acme"), contract=contract.json()["id"])
    yield world
    world.tear_down()


