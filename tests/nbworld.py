"""A real service on a loopback port with notebook sessions, and a Jupyter websocket client that speaks
the wire protocol as JupyterLab does (fixtures and helpers for tests/notebooks).

As deployed: the API app has no Docker access and runs no notebook server; a worker (a `Worker` with a
`DockerRunner` and its kernel runner, as `sandbox worker` builds it) hosts the servers and kernels, and
serves its local socket (exports, DP, uploads). Here both live in the test process, the worker in a thread.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from helpers import Tokens, auth, register_demo
from jobworld import docker_client
from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1, serialize_msg_to_ws_v1
from websockets.sync.client import connect

from runners.docker import DockerRunner
from runners.kernels import DockerKernelRunner
from sandbox.api.app import create_app
from sandbox.config import Settings
from sandbox.instance import Instance, init_instance
from sandbox.notebooks.servers import RunningServer, workspace_dir
from sandbox.worker import Worker
from sandbox.worker_socket import serve_worker_socket

DATASET = "carotid-stenting"
V1 = "v1.kernel.websocket.jupyter.org"
TABLE_SPEC_MIME = "application/vnd.sandbox.table-spec+json"


def show_spec(spec: dict[str, Any], *, lie: str = "the kernel's own rendering") -> str:
    """Cell code that displays a table specification as `sandbox_client.tables.crosstab` does in a kernel,
    with the kernel's own (here: false) renderings beside it, which must never reach the client."""
    return ("from IPython.display import display\n"
            f"display({{{TABLE_SPEC_MIME!r}: {spec!r}, 'text/plain': {lie!r}, 'text/html': '<b>' + {lie!r}}}, "
            "raw=True)")


class LiveServer:
    """uvicorn serving the app in a thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("the service did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@dataclass
class KernelReply:
    """What one execute request produced, as the client saw it."""

    reply: dict[str, Any]
    iopub: list[dict[str, Any]] = field(default_factory=list)

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        return [m for m in self.iopub if m["msg_type"] in types]

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stdout")

    @property
    def text(self) -> str:
        """Everything the client received, as one string (to look for what must not be there)."""
        return json.dumps([self.reply, *self.iopub])


class JupyterKernel:
    """A kernel started through the service's proxy and driven over its websocket (Jupyter's JSON protocol)."""

    def __init__(self, base: str, token: str, *, kernel_id: str | None = None, v1: bool = False) -> None:
        """`v1`: JupyterLab's binary websocket protocol (v1.kernel.websocket.jupyter.org), else JSON text."""
        self.v1 = v1
        self.base, self.token = base, token
        headers = {"Authorization": f"token {token}"}
        if kernel_id is None:
            started = httpx.post(f"{base}api/kernels", headers=headers, json={"name": "sandbox"}, timeout=60)
            assert started.status_code == 201, started.text
            kernel_id = started.json()["id"]
        self.id = kernel_id
        ws_base = base.replace("http://", "ws://")
        self.session = uuid.uuid4().hex
        self.ws = connect(f"{ws_base}api/kernels/{kernel_id}/channels?session_id={self.session}",
                          additional_headers=headers, max_size=64 * 1024 * 1024, open_timeout=30,
                          subprotocols=[V1] if v1 else None)  # type: ignore[list-item]
        assert not v1 or self.ws.subprotocol == V1, "the server agreed to the v1 protocol"
        self.wait_ready()

    def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> str:
        msg_id = uuid.uuid4().hex
        message = {
            "header": {"msg_id": msg_id, "msg_type": msg_type, "session": self.session, "username": "test",
                       "date": datetime.now(UTC).isoformat(), "version": "5.3"},
            "parent_header": {}, "metadata": {}, "content": content, "channel": channel, "buffers": [],
        }
        if self.v1:
            self.ws.send(serialize_msg_to_ws_v1(message, channel, lambda part: json.dumps(part).encode()))
        else:
            self.ws.send(json.dumps(message))
        return msg_id

    def receive(self, timeout: float) -> dict[str, Any]:
        raw = self.ws.recv(timeout=timeout)
        if not self.v1:
            message: dict[str, Any] = json.loads(raw)
            return message
        channel, parts = deserialize_msg_from_ws_v1(raw)
        header, parent, metadata, content = (json.loads(part) for part in parts[:4])
        return {"header": header, "msg_type": header["msg_type"], "parent_header": parent, "metadata": metadata,
                "content": content, "buffers": parts[4:], "channel": channel}

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg_id = self.send("kernel_info_request", {})
            try:
                while True:
                    message = self.receive(timeout=2)
                    if message["msg_type"] == "kernel_info_reply" and message["parent_header"].get("msg_id") == msg_id:
                        return
            except TimeoutError:
                continue
        raise AssertionError("the kernel did not answer kernel_info")

    def request(self, msg_type: str, content: dict[str, Any], *, timeout: float = 60,
                channel: str = "shell") -> KernelReply:
        """Send a request; collect its iopub messages until the kernel is idle and the reply came."""
        msg_id = self.send(msg_type, content, channel=channel)
        result = KernelReply(reply={})
        idle = False
        deadline = time.monotonic() + timeout
        while not (idle and result.reply):
            message = self.receive(timeout=max(0.1, deadline - time.monotonic()))
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["channel"] == "iopub":
                if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                    idle = True
                elif message["msg_type"] != "status":
                    result.iopub.append(message)
            elif message["msg_type"].endswith("_reply"):
                result.reply = message
        return result

    def execute(self, code: str, *, timeout: float = 60, **content: Any) -> KernelReply:
        return self.request("execute_request", {"code": code, "silent": False, "store_history": True,
                                                "user_expressions": {}, "allow_stdin": False, "stop_on_error": True,
                                                **content}, timeout=timeout)

    def close(self) -> None:
        self.ws.close()


WORKER_TICK_S = 0.2


def start_worker(instance: Instance, runner_dir: Path) -> Worker:
    """A worker as `sandbox worker` runs it (less the machine-wide lock), ticking in a thread."""
    runner = DockerRunner(state_dir=runner_dir, instance_id=instance.instance_id)
    worker = Worker(instance, runner, kernels=DockerKernelRunner(instance_id=instance.instance_id,
                                                                 client=runner.client))
    worker.refresh_images()  # published before the first session asks for the kernel image
    worker.start_thread(WORKER_TICK_S)
    return worker


def wait_for_server(session: dict[str, Any], timeout: float = 120) -> None:
    """Wait, as a client's first request does, until the worker has the session's server up.

    A session starts in the store at once; its server comes up in the worker a few seconds later, and the
    proxy holds a request meanwhile (up to its own limit, then 503).
    """
    headers = {"Authorization": f"token {session['token']}"}
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(f"{session['url']}api/status", headers=headers, timeout=timeout)
        if answer.status_code != 503 or time.monotonic() > deadline:
            assert answer.status_code == 200, answer.text
            return


@dataclass
class NotebookWorld:
    url: str
    app: Any
    instance: Instance
    http: httpx.Client
    steward: str
    buyer: str
    contracts: dict[str, str]
    worker: Worker | None
    runner_dir: Path
    sessions: list[str] = field(default_factory=list)
    kernels: list[JupyterKernel] = field(default_factory=list)
    by_tier: dict[str, dict[str, Any]] = field(default_factory=dict)
    kernel_by_tier: dict[str, JupyterKernel] = field(default_factory=dict)

    def session(self, tier: str) -> dict[str, Any]:
        """The tier's session, started once for the module."""
        if tier not in self.by_tier:
            self.by_tier[tier] = self.start(tier)
        return self.by_tier[tier]

    def shared_kernel(self, tier: str) -> JupyterKernel:
        if tier not in self.kernel_by_tier:
            self.kernel_by_tier[tier] = self.kernel(self.session(tier))
        return self.kernel_by_tier[tier]

    def workspace(self, session_id: str) -> Path:
        """The session's workspace, as the worker mounted it."""
        return workspace_dir(self.instance.settings, session_id)

    def server(self, session_id: str) -> RunningServer:
        """The session's live server process in the worker (waits for the worker to start it)."""
        deadline = time.monotonic() + 60
        while True:
            running = self.worker.notebooks.get(session_id) if self.worker and self.worker.notebooks else None
            if running is not None or time.monotonic() > deadline:
                assert running is not None, f"the worker runs no server for {session_id}"
                return running
            time.sleep(0.1)

    def stop_worker(self) -> None:
        """Stop the worker as `sandbox worker` stops on Ctrl-C: its servers end, the sessions stay running."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self.app.state.wake_worker = None
        self.kernel_by_tier.clear()  # their servers are gone, and their websockets with them

    def halt_worker(self) -> None:
        """The worker dies outright, as under SIGKILL: none of its steps runs any more and it stops nothing.

        Its servers live on here (their parent, this process, is alive); the caller decides their fate.
        """
        assert self.worker is not None
        self.worker.stopping.set()
        self.worker.wake()
        self.worker._pool.shutdown(wait=True)  # steps already running end; no new one starts
        self.worker = None
        self.app.state.wake_worker = None
        self.kernel_by_tier.clear()

    def start_worker(self) -> Worker:
        self.worker = start_worker(self.instance, self.runner_dir)
        self.app.state.wake_worker = self.worker.wake  # as `sandbox serve` wires its embedded worker
        return self.worker

    def version_file(self) -> Path:
        return self.instance.settings.artifacts_dir / "datasets" / DATASET / "v1.parquet"

    def mock_file(self) -> Path:
        return self.instance.settings.artifacts_dir / "datasets" / DATASET / "v1.mock.parquet"

    def patient_ids(self) -> list[str]:
        import pyarrow.parquet as pq

        return [str(v) for v in pq.read_table(self.version_file(), columns=["patient_id"]).column(0).to_pylist()]

    def start(self, tier: str, *, token: str | None = None, expect: int = 201) -> dict[str, Any]:
        response = self.http.post("/v1/notebooks", headers=auth(token or self.buyer),
                                  json={"contract": self.contracts[tier], "dataset": DATASET})
        assert response.status_code == expect, response.text
        body: dict[str, Any] = response.json()
        if expect == 201:
            self.sessions.append(body["id"])
            if self.worker is not None:
                wait_for_server(body)
        return body

    def kernel(self, session: dict[str, Any], *, v1: bool = False) -> JupyterKernel:
        kernel = JupyterKernel(session["url"], session["token"], v1=v1)
        self.kernels.append(kernel)
        return kernel

    def audit(self, action: str) -> list[dict[str, Any]]:
        response = self.http.get("/v1/audit", params={"action": action, "limit": 1000}, headers=auth(self.steward))
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()
        return events


def make_notebook_world(instance: Instance, tokens: Tokens, tmp_path: Path) -> Iterator[NotebookWorld]:
    docker_client()
    service = serve_worker_socket(instance)
    app = create_app(instance)
    world: NotebookWorld | None = None
    with ExitStack() as stack, LiveServer(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        stack.callback(service.close)
        stack.callback(lambda: world.stop_worker() if world is not None else None)
        steward = tokens.steward(org="hospital")
        register_demo(http, steward, tmp_path, procedures=300)  # type: ignore[arg-type]
        mock = http.post(f"/v1/datasets/{DATASET}/versions/1/mock", headers=auth(steward), json={"epsilon": 1.0})
        assert mock.status_code == 201, mock.text
        contracts = {}
        for tier in ("dp_only", "aggregate", "trusted"):
            created = http.post("/v1/contracts", headers=auth(steward), json={
                "buyer_org": "acme", "datasets": [DATASET], "tier": tier, "kinds": ["notebook", "query"],
                "purpose": f"notebooks ({tier})", "valid_until": "2099-01-01", "epsilon": 5.0,
                "quotas": {"concurrent_jobs": 4, "cpu_hours": 10}})
            assert created.status_code == 201, created.text
            contracts[tier] = created.json()["id"]
        world = NotebookWorld(url=url, app=app, instance=instance, http=http, steward=steward,
                              buyer=tokens.buyer(org="acme"), contracts=contracts, worker=None,
                              runner_dir=tmp_path / "runner")
        world.start_worker()
        try:
            yield world
        finally:
            for kernel in world.kernels:
                kernel.close()
            for session in world.sessions:
                http.delete(f"/v1/notebooks/{session}", headers=auth(world.buyer))
    left = [c.name for c in docker_client().containers.list(
        all=True, filters={"label": f"org.sandbox.instance={instance.instance_id}"})]
    assert not left, f"containers left behind: {left}"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def nb_world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotebookWorld]:
    """One service, dataset and set of contracts for a whole test module, on SQLite and on PostgreSQL."""
    from pgdb import cloned_database

    tmp = tmp_path_factory.mktemp("notebooks")
    with ExitStack() as stack:
        url = None
        if request.param == "postgres":
            url = stack.enter_context(cloned_database(request.getfixturevalue("postgres_template")))
        settings = Settings(home=tmp / "home", database_url=url, log_json=True, notebook_cull_interval_s=1)
        init_instance(settings)
        instance = Instance(settings)
        stack.callback(instance.close)
        yield from make_notebook_world(instance, Tokens(instance), tmp)
