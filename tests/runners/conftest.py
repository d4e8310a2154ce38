"""Fixtures for the runner tests: a real Docker engine, the analysis image, and a runner that leaves nothing behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from runner_support import JobFiles, assert_nothing_left

from runners.docker import DockerRunner
from runners.images import build_images

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRE_DOCKER = os.environ.get("SANDBOX_REQUIRE_DOCKER") == "1"


def _unavailable(why: str) -> None:
    if REQUIRE_DOCKER:
        pytest.fail(f"Docker is required (SANDBOX_REQUIRE_DOCKER=1) but {why}")
    pytest.skip(f"{why} (set SANDBOX_REQUIRE_DOCKER=1 to fail instead)")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except (docker.errors.DockerException, OSError) as error:
        _unavailable(f"no Docker engine is reachable: {error}")
    if os.geteuid() != 0:
        _unavailable("the Docker runner loop-mounts each job's output quota, which needs root")
    yield client
    client.close()


@pytest.fixture(scope="session")
def analysis_image(docker_client: Any) -> str:
    """The analysis image's local id; built once if missing or stale (fast when up to date)."""
    wheel_cache = Path(os.environ.get("SANDBOX_WHEEL_CACHE", REPO_ROOT / ".cache" / "wheels"))
    ids = build_images(["analysis"], base_image=None, wheel_cache=wheel_cache, rebuild=False, progress=lambda *a: None)
    return ids["analysis"]


@pytest.fixture
def job_files(tmp_path: Path, analysis_image: str) -> JobFiles:
    files = JobFiles(root=tmp_path, image_id=analysis_image)
    files.code_dir.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    cohort = data / "cohort.csv"
    cohort.write_text("patient_id,age,outcome\n1001,64,stroke\n1002,71,none\n")
    files.data_files["cohort.csv"] = cohort
    return files


@pytest.fixture
def instance_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def runner(docker_client: Any, instance_id: str, state_dir: Path) -> Iterator[DockerRunner]:
    """A runner with its own instance label; after the test, no container or mount of it may remain."""
    yield DockerRunner(state_dir=state_dir, instance_id=instance_id, client=docker_client)
    assert_nothing_left(docker_client, instance_id, state_dir)
