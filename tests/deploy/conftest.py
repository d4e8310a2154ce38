"""Deployment tests: the docker-compose deployment from local images, and the embedded worker that waits for
Docker. Run them alone with `pytest -m deploy` (or `pytest tests/deploy`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from runners.images import build_images

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRE_DOCKER = os.environ.get("SANDBOX_REQUIRE_DOCKER") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "deploy: brings a deployment up on the real Docker engine (alone: -m deploy)")


def unavailable(why: str) -> None:
    """Skip, unless SANDBOX_REQUIRE_DOCKER=1 says the machine must run these tests: then fail."""
    if REQUIRE_DOCKER:
        pytest.fail(f"Docker is required (SANDBOX_REQUIRE_DOCKER=1) but {why}")
    pytest.skip(f"{why} (set SANDBOX_REQUIRE_DOCKER=1 to fail instead)")


@pytest.fixture(scope="session")
def engine() -> Any:
    """The real Docker engine, as root (the worker loop-mounts job quotas; the deployment's folders are mounts)."""
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except (docker.errors.DockerException, OSError) as error:
        unavailable(f"no Docker engine is reachable: {error}")
    if os.geteuid() != 0:
        unavailable("the deployment tests need root: the worker loop-mounts each job's output quota")
    yield client
    client.close()


@pytest.fixture(scope="session")
def wheel_cache() -> Path:
    return Path(os.environ.get("SANDBOX_WHEEL_CACHE", REPO_ROOT / ".cache" / "wheels"))


@pytest.fixture(scope="session")
def built_images(engine: Any, wheel_cache: Path) -> dict[str, str]:
    """Every image, built or reused as `sandbox images build` does (seconds when up to date)."""
    return build_images(None, base_image=None, wheel_cache=wheel_cache, rebuild=False, progress=lambda *_: None)


@pytest.fixture(scope="session")
def compose_command(engine: Any) -> list[str]:
    """docker-compose (Debian's 1.29), or the `docker compose` plugin where only that is installed."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if plugin.returncode == 0:
        return ["docker", "compose"]
    pytest.fail("docker-compose is not installed: `apt-get install docker-compose` (./run.sh test installs it)")
