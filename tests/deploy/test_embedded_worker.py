"""`sandbox serve` (and so `./run.sh demo`) serves at once, before the Docker engine answers, and its embedded
worker keeps trying: a job queued meanwhile runs as soon as the engine is there. On the real engine; only
the moment it becomes reachable is staged, by pointing DOCKER_HOST at a socket path that does not exist
yet and then linking the engine's socket there.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from runners.images import build_images
from sandbox.client import SandboxClient
from sandbox.config import Settings
from sandbox.demo_setup import set_up_demo
from sandbox.instance import Instance
from sandbox.store.models import ImageRecord

pytestmark = [pytest.mark.deploy, pytest.mark.docker, pytest.mark.slow]

DATASET = "carotid-stenting"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def engine_socket() -> Path:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.skip(f"the engine is not on a Unix socket here ({host})")
    return Path(host.removeprefix("unix://"))


def code_bundle(path: Path) -> Path:
    data = b'from sandbox_client import tables\nprint("rows:", len(tables.read("/data/carotid-stenting.parquet")))\n'
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("main.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def served_without_engine(engine: Any, wheel_cache: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A demo instance served by `sandbox serve` whose DOCKER_HOST names a socket that is not there yet."""
    analysis = build_images(["analysis"], base_image=None, wheel_cache=wheel_cache, rebuild=False,
                            progress=lambda *_: None)["analysis"]
    settings = Settings(home=tmp_path / "home")
    demo = set_up_demo(settings)
    instance = Instance(settings)
    # An earlier run's worker published the image; the engine is what is missing now (dockerd still starting).
    with instance.sessions() as session, session.begin():
        session.merge(ImageRecord(name="analysis", image_id=analysis, seen_at=datetime.now(UTC)))
    instance.close()

    pending_engine = tmp_path / "engine.sock"
    port = free_port()
    log_path = tmp_path / "serve.log"
    environment = {**os.environ, "SANDBOX_HOME": str(settings.home), "DOCKER_HOST": f"unix://{pending_engine}",
                   "SANDBOX_EMBEDDED_WORKER": "true"}
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-c", "from sandbox.cli import main; main()", "serve", "--port", str(port)],
            env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"sandbox serve exited:\n{log_path.read_text()[-4000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the API did not start:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.3)
        yield {"url": url, "demo": demo, "pending_engine": pending_engine, "log": log_path, "settings": settings}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        instance = Instance(settings)
        for container in engine.containers.list(
                all=True, filters={"label": f"org.sandbox.instance={instance.instance_id}"}):
            container.remove(force=True, v=True)
        prefix = str(settings.home_dir)
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(prefix + "/")), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", target], check=False, capture_output=True)
        instance.close()


def test_a_job_queued_before_the_engine_answers_runs_once_it_does(
    served_without_engine: dict[str, Any], tmp_path: Path
) -> None:
    served = served_without_engine
    demo = served["demo"]
    buyer = SandboxClient(served["url"], demo["tokens"]["buyer"])
    spec = {"contract": demo["contract"], "dataset": DATASET, "image": "analysis", "command": ["python3", "main.py"],
            "resources": {"cpus": 1, "memory_mb": 1024, "timeout_s": 300}}
    job = buyer.submit_job(spec, code_bundle(tmp_path / "code.tar.gz"))
    assert job["state"] == "queued", job

    # No engine: the API answers everything else, and the job waits.
    time.sleep(6)
    assert buyer.job(job["id"])["state"] == "queued", "a job ran with no engine?"
    assert buyer.list_datasets(), "the API stopped answering while the worker waits for Docker"
    sql = f'SELECT COUNT(*) AS n FROM "{DATASET}"'
    assert buyer.query(demo["contract"], DATASET, sql, epsilon=0.1)["rows"], "DP queries need no Docker"
    assert "no job worker yet" in served["log"].read_text(), "the wait is not explained to the operator"

    served["pending_engine"].symlink_to(engine_socket())  # the engine answers from now on
    deadline = time.monotonic() + 180
    state = "queued"
    while state not in ("in_review", "done", "failed") and time.monotonic() < deadline:
        state = buyer.job(job["id"], wait_s=10, since=state)["state"]
    final = buyer.job(job["id"])
    assert final["state"] == "in_review", (
        f"the job is {final['state']} ({final.get('reason')}), not in review; "
        f"serve's log:\n{served['log'].read_text()[-4000:]}"
    )
    buyer.close()
