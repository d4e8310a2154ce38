"""Kernels in the sandbox, on the server's side: one kernel spec, a kernel manager that refuses what the
contract does not allow, and a jupyter_client provisioner that runs each kernel through the worker's
kernel runner (`runners.kernels`) in a hardened, network-less container.

The kernel and the server talk over ZeroMQ IPC sockets in a per-kernel folder that is mounted into the
container (`transport="ipc"`): the container has no network at all. The session's workspace, a quota file
system the worker mounted, is the kernel's writable `/output` and working folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import time
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.provisioning.factory import KernelProvisionerFactory
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from jupyter_server.services.sessions.sessionmanager import SessionManager
from tornado import web
from traitlets import Instance, default

from runners.base import JobDefinition, KernelDefinition, Resources, RunState
from runners.kernels import IPC_DIR
from sandbox.notebooks.jupyter.runtime import Runtime

KERNEL_NAME = "sandbox"
REST_EXECUTION_STATE = "unknown"  # what the REST models say of a kernel's state, whatever the kernel said
PROVISIONER_NAME = "sandbox-docker"
# umask 0: the server (another uid) must be able to connect to the sockets the kernel binds.
KERNEL_COMMAND = ["sh", "-c", f"umask 0 && exec python -m ipykernel_launcher -f {IPC_DIR}/connection.json"]
# No message from a kernel may be larger: the server would hold it in memory before the filter sees it.
MAX_KERNEL_MESSAGE_BYTES = 64 * 1024 * 1024


def kernel_spec() -> KernelSpec:
    return KernelSpec(
        argv=KERNEL_COMMAND, display_name="Python 3 (sandbox)", language="python", interrupt_mode="signal",
        metadata={"kernel_provisioner": {"provisioner_name": PROVISIONER_NAME}}, env={}, resource_dir="",
    )


def register_provisioner() -> None:
    """Make the sandbox provisioner known to this process's jupyter_client, and to no other Jupyter.

    Registered here rather than as a package entry point: only the notebook server child may start
    sandbox kernels, and a moved module needs no reinstalled package metadata.
    """
    factory = KernelProvisionerFactory.instance()  # fills its table from entry points once; ours goes after
    factory.provisioners[PROVISIONER_NAME] = EntryPoint(
        name=PROVISIONER_NAME, value=f"{__name__}:SandboxKernelProvisioner", group=factory.GROUP_NAME)


class SandboxKernelSpecManager(KernelSpecManager):
    """Offers the sandbox kernel and nothing else: no kernel may run in the server's own process tree."""

    def find_kernel_specs(self) -> dict[str, str]:
        return {KERNEL_NAME: ""}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name != KERNEL_NAME:
            raise NoSuchKernel(kernel_name)
        return kernel_spec()

    def get_all_specs(self) -> dict[str, dict[str, Any]]:
        return {KERNEL_NAME: {"resource_dir": "", "spec": kernel_spec().to_dict()}}


class BoundedContext(zmq.asyncio.Context):
    """ZeroMQ sockets that drop a peer sending a message over MAX_KERNEL_MESSAGE_BYTES."""

    def socket(self, socket_type: int, *args: Any, **kwargs: Any) -> Any:
        sock = super().socket(socket_type, *args, **kwargs)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_KERNEL_MESSAGE_BYTES)
        return sock


class SandboxKernelManager(AsyncMappingKernelManager):
    """Refuses kernels the contract may not have: over its kernel limit, out of CPU-hours, or no longer valid."""

    runtime = Instance(Runtime, help="the session's collaborators (`server.server_config` sets it)").tag(config=True)

    @default("context")
    def _bounded_context(self) -> zmq.asyncio.Context:
        self._created_context = True
        return BoundedContext()

    async def start_kernel(self, *, kernel_id: str | None = None, path: str | None = None,  # type: ignore[override]
                           **kwargs: Any) -> str:
        if kernel_id is None or kernel_id not in self:
            name = kwargs.get("kernel_name") or KERNEL_NAME
            if name != KERNEL_NAME:
                raise web.HTTPError(403, f"only the {KERNEL_NAME!r} kernel runs here")
            problem = await asyncio.to_thread(self.runtime.kernel_refusal)
            if problem:
                raise web.HTTPError(403, problem)
        kwargs["kernel_name"] = KERNEL_NAME
        return str(await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs))  # type: ignore[arg-type]

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        """The REST model of a kernel (GET /api/kernels, /api/sessions), from platform values only.

        Jupyter copies `execution_state` from the kernel's own status messages, so a kernel could put anything
        there and have it served outside the message filter. The platform does not know the state from REST,
        so it says so; clients follow the state on the websocket, where the filter sees every status.
        """
        model: dict[str, Any] = super().kernel_model(kernel_id)
        return {"id": model["id"], "name": KERNEL_NAME, "last_activity": model["last_activity"],
                "execution_state": REST_EXECUTION_STATE, "connections": int(model.get("connections") or 0)}


class SandboxSessionManager(SessionManager):
    """Creates one session per path at a time, so two requests at once share one kernel; and keeps a session's
    live kernel when a client asks for a new kernel of the one spec there is.

    JupyterLab opening a notebook may ask for its session twice at once; Jupyter's handler checks for a
    session before creating one, so both requests started a kernel container, and the browser could stay
    attached to the one that was then shut down, its cells never running.

    A cell run before Lab has bound the notebook to its session makes Lab ask for a kernel by name
    (`PATCH /api/sessions/<id>` with `{"kernel": {"name": "sandbox"}}`) once the session exists. Jupyter
    would start a second container and shut the first down: a contract's second kernel, and once the new
    one is up Lab drops the cells it had sent to the old one, their output never shown. A fresh kernel is
    what Restart gives.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._creating: dict[str, asyncio.Lock] = {}

    async def create_session(self, path: str | None = None, name: Any = None, type: str | None = None,
                             kernel_name: Any = None, kernel_id: str | None = None) -> dict[str, Any]:
        lock = self._creating.setdefault(path or "", asyncio.Lock())
        async with lock:
            if path is not None and await self.session_exists(path=path):
                existing: dict[str, Any] = await self.get_session(path=path)
                return existing
            created: dict[str, Any] = await super().create_session(path=path, name=name, type=type,
                                                                   kernel_name=kernel_name, kernel_id=kernel_id)
            return created

    async def start_kernel_for_session(self, session_id: str, path: str | None, name: Any, type: str | None,
                                       kernel_name: Any, kernel_id: str | None = None) -> str:
        if kernel_id is None and kernel_name in (None, KERNEL_NAME):
            live = await self._live_kernel(session_id)
            if live is not None:
                return live
        started: str = await super().start_kernel_for_session(session_id, path, name, type, kernel_name, kernel_id)
        return started

    async def _live_kernel(self, session_id: str) -> str | None:
        """The session's kernel, if the session exists and its kernel runs (a new session has none)."""
        row = self.cursor.execute("SELECT kernel_id FROM session WHERE session_id=?", (session_id,)).fetchone()
        if row is None or row[0] is None or row[0] not in self.kernel_manager:
            return None
        alive = await self.kernel_manager.is_alive(row[0])
        return str(row[0]) if alive else None


class KernelFolders:
    """One kernel's host folders, under the session's server folder; every call is blocking."""

    def __init__(self, kernel_root: Path, key: str) -> None:
        self.ipc_dir = kernel_root / "k" / key  # mounted at IPC_DIR: the connection file and the sockets
        self.dp_dir = kernel_root / "d" / key  # mounted at /run/sandbox: the kernel's DP socket
        self.host_connection = kernel_root / "c" / f"{key}.json"  # the server's side of the connection

    def prepare(self) -> None:
        for folder in (self.ipc_dir, self.dp_dir, self.host_connection.parent):
            folder.mkdir(parents=True, exist_ok=True)
        # The kernel's uid binds sockets here; nothing else is in this folder, and only it is mounted.
        os.chmod(self.ipc_dir, 0o777)  # noqa: S103
        os.chmod(self.host_connection.parent, 0o700)

    def write_connection_file(self, info: dict[str, Any]) -> None:
        """The connection file as the kernel sees it: the same key and ports, its sockets under IPC_DIR."""
        inside = {**info, "ip": f"{IPC_DIR}/k"}
        inside["key"] = info["key"].decode() if isinstance(info["key"], bytes) else info["key"]
        path = self.ipc_dir / "connection.json"
        path.write_text(json.dumps(inside))
        os.chmod(path, 0o644)

    def remove(self) -> None:
        for folder in (self.ipc_dir, self.dp_dir):
            shutil.rmtree(folder, ignore_errors=True)
        self.host_connection.unlink(missing_ok=True)


class SandboxKernelProvisioner(KernelProvisionerBase):
    """Starts the kernel in a sandbox container; registered as the `sandbox-docker` provisioner."""

    runtime = Instance(Runtime, help="the session's collaborators (`server.server_config` sets it)").tag(config=True)
    key: str | None = None
    folders: KernelFolders | None = None
    started_at: float | None = None
    cpu_seconds = 0.0  # the most the kernel's cgroup reported; sampled while it runs, gone once it exits
    timed_out = False

    @property
    def has_process(self) -> bool:
        return self.key is not None

    def definition(self) -> KernelDefinition:
        rt: Runtime = self.runtime
        spec, settings = rt.spec, rt.notebook_settings
        assert self.key is not None and self.folders is not None
        job = JobDefinition(
            id=f"{spec.job}-{self.key}", org=spec.org, image=spec.image_id, command=KERNEL_COMMAND,
            code_dir=Path(spec.code_dir),
            data_files={name: Path(path) for name, path in spec.data_files.items()},
            data_folders={name: Path(path) for name, path in spec.data_folders.items()},
            resources=Resources(cpus=float(settings["kernel_cpus"]), memory_mb=int(settings["kernel_memory_mb"]),
                                timeout_s=int(float(settings["max_kernel_hours"]) * 3600)),
            dp_socket=self.folders.dp_dir / "dp.sock",
        )
        return KernelDefinition(key=self.key, notebook=spec.job, contract=spec.contract, job=job,
                                workspace=Path(spec.workspace), ipc_dir=self.folders.ipc_dir)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        rt: Runtime = self.runtime
        km: Any = self.parent
        if self.key is None:
            self.key = secrets.token_hex(6)
            self.folders = KernelFolders(Path(rt.spec.kernel_root), self.key)
        folders = self.folders
        assert folders is not None
        await asyncio.to_thread(folders.prepare)
        km.transport = "ipc"
        km.ip = str(folders.ipc_dir / "k")
        km.connection_file = str(folders.host_connection)
        km.write_connection_file()
        self.connection_info = km.get_connection_info()
        await asyncio.to_thread(folders.write_connection_file, dict(self.connection_info))
        kwargs.pop("extra_arguments", None)
        return await super().pre_launch(cmd=KERNEL_COMMAND, **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        rt: Runtime = self.runtime
        assert self.key is not None and self.folders is not None
        await asyncio.to_thread(rt.open_dp_socket, self.key, self.folders.dp_dir / "dp.sock")
        await asyncio.to_thread(rt.kernels.start_kernel, self.definition())
        self.started_at = time.time()
        self.timed_out = False
        rt.record("notebook.kernel.start", kernel=self.key)
        return self.connection_info

    async def poll(self) -> int | None:
        if self.key is None:
            return 0
        rt: Runtime = self.runtime
        status = await asyncio.to_thread(rt.kernels.kernel_status, self.key)
        self.cpu_seconds = max(self.cpu_seconds, status.cpu_seconds)
        if status.timed_out and not self.timed_out:
            self.timed_out = True
            rt.record("notebook.kernel.timeout", kernel=self.key)
        if status.state is RunState.UNKNOWN:
            return 0
        if status.state is RunState.EXITED:
            return status.exit_code or 0
        return None

    async def wait(self) -> int | None:
        while True:
            status = await self.poll()
            if status is not None:
                return status
            await asyncio.sleep(0.1)

    async def send_signal(self, signum: int) -> None:
        if self.key is not None:
            await asyncio.to_thread(self.runtime.kernels.signal_kernel, self.key, signum)

    async def shutdown_requested(self, restart: bool = False) -> None:
        await self.poll()  # the last CPU sample while the kernel's cgroup still exists

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        key, folders = self.key, self.folders
        if key is None or folders is None:
            return
        rt: Runtime = self.runtime
        last = await asyncio.to_thread(rt.kernels.remove_kernel, key)
        if self.started_at is not None:  # a kernel that never started used nothing
            await asyncio.to_thread(rt.add_usage, cpu_seconds=max(self.cpu_seconds, last.cpu_seconds),
                                    wall_seconds=time.time() - self.started_at, kernel=key)
        self.cpu_seconds, self.started_at = 0.0, None
        rt.close_dp_socket(key)
        rt.record("notebook.kernel.stop", kernel=key, restart=restart)
        if not restart:
            await asyncio.to_thread(folders.remove)
            self.key = self.folders = None

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return 2.0

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return 1.0
