"""The worker hosts the notebook servers and kernels; the API process keeps the sessions and proxies to them
(issue 12: only the worker touches Docker). Without a worker the proxy says so (503) and the session
waits for one; a worker that dies is replaced by one that brings the servers back and removes the kernels
nobody relays for any more; the API process never loads the Docker SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import Tokens, auth, register_demo
from jobworld import docker_client
from nbworld import DATASET, NotebookWorld, wait_for_server
from sqlalchemy import select

from runners.base import JobDefinition, KernelDefinition
from runners.kernels import DockerKernelRunner
from sandbox.instance import Instance
from sandbox.notebooks import servers
from sandbox.store.models import ImageRecord

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Worker hosting is about processes, not the store (test_notebooks.py runs on both): SQLite only.
SQLITE_WORLD = pytest.mark.parametrize("nb_world", ["sqlite"], indirect=True, scope="module")


def _containers(label: str) -> list[str]:
    return [c.name for c in docker_client().containers.list(all=True, filters={"label": label})]


def _eventually(check: Any, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@SQLITE_WORLD
def test_without_a_worker_the_proxy_answers_503_and_the_session_waits_for_one(nb_world: NotebookWorld) -> None:
    nb_world.stop_worker()
    nb_world.app.state.notebook_server_wait_s = 2.0
    try:
        session = nb_world.start("trusted")  # a session is a store row: the API starts it alone
        headers = {"Authorization": f"token {session['token']}"}
        asked = time.monotonic()
        refused = httpx.get(f"{session['url']}api/status", headers=headers, timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "worker" in refused.json()["detail"], refused.json()
        assert time.monotonic() - asked < 20, "the proxy waits a bounded time for the worker"
        exported = nb_world.http.post(f"/v1/notebooks/{session['id']}/exports", headers=auth(nb_world.buyer),
                                      json={"path": "nothing.png"})
        assert exported.status_code == 404, "the worker's local service answers exports (no such file yet)"
    finally:
        del nb_world.app.state.notebook_server_wait_s
    nb_world.start_worker()
    answered = httpx.get(f"{session['url']}api/status", headers=headers, timeout=60)
    assert answered.status_code == 200, "once a worker runs, the same session and token work"
    kernel = nb_world.kernel(session)
    assert "2" in kernel.execute("print(1 + 1)").stdout


@SQLITE_WORLD
def test_a_server_that_cannot_start_is_reported_and_tried_again(nb_world: NotebookWorld,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if nb_world.worker is None:
        nb_world.start_worker()
    created = nb_world.http.post("/v1/contracts", headers=auth(nb_world.steward), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "trusted", "kinds": ["notebook"],
        "purpose": "a server that fails once", "valid_until": "2099-01-01", "epsilon": 1.0,
        "quotas": {"cpu_hours": 1}})
    assert created.status_code == 201, created.text
    monkeypatch.setattr(servers, "SERVER_MODULE", "sandbox.notebooks.no_such_server")
    response = nb_world.http.post("/v1/notebooks", headers=auth(nb_world.buyer),
                                  json={"contract": created.json()["id"], "dataset": DATASET})
    assert response.status_code == 201, response.text
    session = response.json()
    nb_world.sessions.append(session["id"])
    headers = {"Authorization": f"token {session['token']}"}
    refused = httpx.get(f"{session['url']}api/status", headers=headers, timeout=60)
    assert refused.status_code == 503 and "could not start" in refused.json()["detail"], refused.text
    monkeypatch.undo()
    wait_for_server(session)  # the worker tries again a little later, and then the server answers


def _orphan_kernel(world: NotebookWorld, tmp_path: Path) -> str:
    """A kernel container of a session no server of any worker runs (as a crash between two steps leaves)."""
    with world.instance.read_session() as session:
        image = session.execute(select(ImageRecord.image_id).where(ImageRecord.name == "analysis")).scalar_one()
    for folder in ("code", "workspace", "ipc"):
        (tmp_path / folder).mkdir()
    data = tmp_path / "data.parquet"
    data.write_bytes(world.version_file().read_bytes())
    runner = DockerKernelRunner(instance_id=world.instance.instance_id)
    job = JobDefinition(id="j-orphan-k1", org="acme", image=image, command=["sleep", "600"],
                        code_dir=tmp_path / "code", data_files={f"{DATASET}.parquet": data})
    runner.start_kernel(KernelDefinition(key="orphan-k1", notebook="j-orphan", contract="c-none", job=job,
                                         workspace=tmp_path / "workspace", ipc_dir=tmp_path / "ipc"))
    return "org.sandbox.notebook=j-orphan"


@SQLITE_WORLD
def test_a_killed_worker_is_replaced_its_servers_come_back_and_orphan_kernels_go(
        nb_world: NotebookWorld, tmp_path: Path) -> None:
    if nb_world.worker is None:
        nb_world.start_worker()
    kept, ended = nb_world.start("trusted"), nb_world.start("aggregate")
    for session in (kept, ended):
        kernel = nb_world.kernel(session)
        assert kernel.execute("x = 41").reply["content"]["status"] == "ok"
    servers = [nb_world.server(session["id"]) for session in (kept, ended)]
    orphan = _orphan_kernel(nb_world, tmp_path)

    # The worker dies outright; its servers die hard too, so nothing shuts their kernels down.
    nb_world.halt_worker()
    for server in servers:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
    assert _containers(f"org.sandbox.notebook={kept['id']}") and _containers(f"org.sandbox.notebook={ended['id']}")
    # While no worker runs, the buyer stops one session: the store says it ended; nothing is torn down yet.
    nb_world.app.state.notebook_teardown_wait_s = 0.5
    try:
        stopped = nb_world.http.delete(f"/v1/notebooks/{ended['id']}", headers=auth(nb_world.buyer))
    finally:
        del nb_world.app.state.notebook_teardown_wait_s
    assert stopped.status_code == 200 and stopped.json()["state"] == "done", stopped.text
    nb_world.sessions.remove(ended["id"])
    assert nb_world.workspace(ended["id"]).exists(), "the API process tears nothing down itself"

    nb_world.start_worker()
    headers = {"Authorization": f"token {kept['token']}"}
    kernels = httpx.get(f"{kept['url']}api/kernels", headers=headers, timeout=60)
    assert kernels.status_code == 200 and kernels.json() == [], "the running session's server is back, bare"
    assert _eventually(lambda: not _containers(f"org.sandbox.notebook={kept['id']}")), \
        "the dead server's kernel container is removed"
    assert _eventually(lambda: not _containers(f"org.sandbox.notebook={ended['id']}")), \
        "the ended session's kernel container is removed"
    assert _eventually(lambda: not _containers(orphan)), "a kernel of no live server is removed"
    assert _eventually(lambda: not nb_world.workspace(ended["id"]).exists()), "the ended session's workspace goes"
    again = nb_world.kernel(kept)
    assert "NameError" in again.execute("print(x)").text, "a new kernel, not the old one"


API_FLOW = textwrap.dedent("""
    import json, sys
    from fastapi.testclient import TestClient
    from sandbox.api.app import create_app
    from sandbox.config import Settings
    from sandbox.instance import Instance

    buyer, contract, dataset = sys.argv[1:4]
    bearer = {"Authorization": f"Bearer {buyer}"}
    app = create_app(Instance(Settings()))
    app.state.notebook_server_wait_s = 0.5
    app.state.notebook_teardown_wait_s = 0.5
    seen = {}
    with TestClient(app) as client:
        started = client.post("/v1/notebooks", headers=bearer, json={"contract": contract, "dataset": dataset})
        session = started.json()
        seen["start"] = started.status_code
        seen["proxy"] = client.get(f"/notebooks/{session['id']}/api/status",
                                   headers={"Authorization": f"token {session['token']}"}).status_code
        seen["export"] = client.post(f"/v1/notebooks/{session['id']}/exports", headers=bearer,
                                     json={"path": "a.png"}).status_code
        seen["stop"] = client.delete(f"/v1/notebooks/{session['id']}", headers=bearer).status_code
    seen["docker"] = sorted(m for m in sys.modules if m == "docker" or m.startswith("docker."))
    seen["notebook_modules"] = sorted(m for m in sys.modules if m.startswith(("sandbox.notebooks", "runners")))
    print(json.dumps(seen))
""")


def test_the_api_process_never_imports_docker(instance: Instance, tokens: Tokens, api: Any, tmp_path: Path) -> None:
    """A session's whole flow through the API app alone (start, proxy, export, stop) loads no Docker SDK."""
    steward = tokens.steward()
    register_demo(api, steward, tmp_path)
    created = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "trusted", "kinds": ["notebook"], "purpose": "import check",
        "valid_until": "2099-01-01", "epsilon": 1.0, "quotas": {"cpu_hours": 1}})
    assert created.status_code == 201, created.text
    with instance.engine.begin() as connection:  # as a worker publishes its images
        connection.execute(ImageRecord.__table__.insert().values(
            name="analysis", image_id="sha256:" + "0" * 64, seen_at=datetime.now(UTC)))
    settings = instance.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    env.update(SANDBOX_HOME=str(settings.home_dir), SANDBOX_DP_SOCKET_ROOT=str(settings.dp_socket_root))
    if settings.database_url:
        env["SANDBOX_DATABASE_URL"] = settings.database_url
    result = subprocess.run([sys.executable, "-c", API_FLOW, tokens.buyer(), created.json()["id"], DATASET],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["start"] == 201 and seen["proxy"] == 503 and seen["stop"] == 200, seen
    assert seen["export"] == 404, "forwarded to the worker's service, which finds no such file"
    assert seen["docker"] == [], f"the API process loaded the Docker SDK: {seen['docker'][:5]}"
    # Of the runners, only the contract (dataclasses, the job images' names; no Docker) is the API's to know.
    assert [m for m in seen["notebook_modules"] if m.startswith("runners")] == ["runners", "runners.base"], seen
    assert [m for m in seen["notebook_modules"] if not m.startswith("runners")] == [
        "sandbox.notebooks", "sandbox.notebooks.endpoint", "sandbox.notebooks.sessions", "sandbox.notebooks.spec"], seen
