"""Kernels in the sandbox: each one a hardened, network-less container started by a jupyter_client provisioner.

The kernel and the server talk over ZeroMQ IPC sockets in a per-kernel folder that is mounted into the
container (`transport="ipc"`): the container has no network at all. The container is the job baseline
(`runners.docker.container_options`): read-only root, no capabilities, non-root user, pids, memory and CPU
limits, `/data` by tier, the DP socket at /run/sandbox. The session's workspace, a quota file system, is
its writable `/output` and working folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import zmq
import zmq.asyncio
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import default

from runners.base import LABEL_INSTANCE, LABEL_JOB, LABEL_MANAGED, JobDefinition, Resources
from runners.cgroup_usage import read_cgroup_usage
from runners.docker import container_options
from sandbox.notebooks.runtime import Runtime, runtime

KERNEL_NAME = "sandbox"
REST_EXECUTION_STATE = "unknown"  # what the REST models say of a kernel's state, whatever the kernel said
PROVISIONER_NAME = "sandbox-docker"
KERNEL_PREFIX = "sandbox-kernel-"
LABEL_KERNEL = "org.sandbox.kernel"
LABEL_CONTRACT = "org.sandbox.contract"
LABEL_NOTEBOOK = "org.sandbox.notebook"
IPC_DIR = "/run/kernel"
# umask 0: the server (another uid) must be able to connect to the sockets the kernel binds.
KERNEL_COMMAND = ["sh", "-c", f"umask 0 && exec python -m ipykernel_launcher -f {IPC_DIR}/connection.json"]


def kernel_spec() -> KernelSpec:
    return KernelSpec(
        argv=KERNEL_COMMAND, display_name="Python 3 (sandbox)", language="python", interrupt_mode="signal",
        metadata={"kernel_provisioner": {"provisioner_name": PROVISIONER_NAME}}, env={}, resource_dir="",
    )


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


# No message from a kernel may be larger: the server would hold it in memory before the filter sees it.
MAX_KERNEL_MESSAGE_BYTES = 64 * 1024 * 1024


class BoundedContext(zmq.asyncio.Context):
    """ZeroMQ sockets that drop a peer sending a message over MAX_KERNEL_MESSAGE_BYTES."""

    def socket(self, socket_type: int, *args: Any, **kwargs: Any) -> Any:
        sock = super().socket(socket_type, *args, **kwargs)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_KERNEL_MESSAGE_BYTES)
        return sock


class SandboxKernelManager(AsyncMappingKernelManager):
    """Refuses kernels the contract may not have: over its kernel limit, out of CPU-hours, or no longer valid."""

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
            problem = await asyncio.to_thread(runtime().kernel_refusal)
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


class KernelContainer:
    """One kernel's container and its host folders; every call is blocking (run it in a thread)."""

    def __init__(self, rt: Runtime, kernel_key: str) -> None:
        spec = rt.spec
        self.rt = rt
        self.key = kernel_key
        self.name = KERNEL_PREFIX + kernel_key
        root = Path(spec.kernel_root)
        self.ipc_dir = root / "k" / kernel_key
        self.dp_dir = root / "d" / kernel_key
        self.host_connection = root / "c" / f"{kernel_key}.json"
        self.started_at: float | None = None
        self.cpu_seconds = 0.0  # the most the kernel's cgroup reported; sampled while it runs

    def prepare_folders(self) -> None:
        for folder in (self.ipc_dir, self.dp_dir, self.host_connection.parent):
            folder.mkdir(parents=True, exist_ok=True)
        # The kernel's uid binds sockets here; nothing else is in this folder, and only it is mounted.
        os.chmod(self.ipc_dir, 0o777)  # noqa: S103
        os.chmod(self.host_connection.parent, 0o700)

    def write_connection_files(self, info: dict[str, Any]) -> None:
        inside = {**info, "ip": f"{IPC_DIR}/k"}
        inside["key"] = info["key"].decode() if isinstance(info["key"], bytes) else info["key"]
        path = self.ipc_dir / "connection.json"
        path.write_text(json.dumps(inside))
        os.chmod(path, 0o644)

    def definition(self) -> JobDefinition:
        spec, settings = self.rt.spec, self.rt.notebook_settings
        return JobDefinition(
            id=f"{spec.job}-{self.key}", org=spec.org, image=spec.image_id, command=KERNEL_COMMAND,
            code_dir=Path(spec.code_dir), data_files={f"{spec.dataset}.parquet": Path(spec.data_file)},
            resources=Resources(cpus=float(settings["kernel_cpus"]), memory_mb=int(settings["kernel_memory_mb"]),
                                timeout_s=int(float(settings["max_kernel_hours"]) * 3600)),
            dp_socket=self.dp_dir / "dp.sock",
        )

    def start(self) -> None:
        rt = self.rt
        options = container_options(self.definition(), instance_id=rt.instance.instance_id,
                                    output_dir=Path(rt.spec.workspace))
        options["name"] = self.name
        options["working_dir"] = "/output"
        labels = options["labels"]
        labels.pop(LABEL_JOB)  # not a job: the job worker's reconciliation must leave it alone
        labels.update({LABEL_KERNEL: self.key, LABEL_NOTEBOOK: rt.spec.job, LABEL_CONTRACT: rt.spec.contract})
        options["mounts"].append(docker.types.Mount(target=IPC_DIR, source=str(self.ipc_dir), type="bind",
                                                    read_only=False))
        rt.docker.containers.create(**options).start()
        self.started_at = time.time()

    def container(self) -> Any:
        try:
            return self.rt.docker.containers.get(self.name)
        except docker.errors.NotFound:
            return None

    def exit_code(self) -> int | None:
        """None while it runs; its exit code once it stopped (or 0 when it is gone)."""
        container = self.container()
        if container is None:
            return 0
        state = container.attrs["State"]
        if state["Status"] in ("running", "restarting", "paused", "created"):
            self.sample(container)
            self._over_time(container, state)
            return None
        return int(state.get("ExitCode") or 0)

    def _over_time(self, container: Any, state: dict[str, Any]) -> None:
        limit = float(self.rt.notebook_settings["max_kernel_hours"]) * 3600
        if self.started_at is not None and time.time() - self.started_at > limit:
            self.rt.record("notebook.kernel.timeout", kernel=self.key)
            container.kill()

    def signal(self, signum: int) -> None:
        container = self.container()
        if container is not None and container.status == "running":
            container.kill(signal=signum)

    def sample(self, container: Any | None = None) -> None:
        """Remember the kernel's CPU time so far: once it has exited, its cgroup is gone."""
        container = container or self.container()
        if container is None:
            return
        pid = int(container.attrs["State"].get("Pid") or 0)
        usage = read_cgroup_usage(pid, str(container.id)) if pid else None
        if usage is not None:
            self.cpu_seconds = max(self.cpu_seconds, usage.cpu_seconds)

    def remove(self) -> None:
        container = self.container()
        if container is None:
            return
        self.sample(container)
        wall = time.time() - self.started_at if self.started_at else 0.0
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
        self.rt.add_usage(cpu_seconds=self.cpu_seconds, wall_seconds=wall, kernel=self.key)

    def remove_folders(self) -> None:
        for folder in (self.ipc_dir, self.dp_dir):
            shutil.rmtree(folder, ignore_errors=True)
        self.host_connection.unlink(missing_ok=True)


class DockerKernelProvisioner(KernelProvisionerBase):
    """Starts the kernel in a sandbox container; registered as the `sandbox-docker` provisioner."""

    kernel: KernelContainer | None = None

    @property
    def has_process(self) -> bool:
        return self.kernel is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        rt = runtime()
        km: Any = self.parent
        if self.kernel is None:
            self.kernel = KernelContainer(rt, secrets.token_hex(6))
        kernel = self.kernel
        await asyncio.to_thread(kernel.prepare_folders)
        km.transport = "ipc"
        km.ip = str(kernel.ipc_dir / "k")
        km.connection_file = str(kernel.host_connection)
        km.write_connection_file()
        self.connection_info = km.get_connection_info()
        await asyncio.to_thread(kernel.write_connection_files, dict(self.connection_info))
        kwargs.pop("extra_arguments", None)
        return await super().pre_launch(cmd=KERNEL_COMMAND, **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        assert self.kernel is not None
        rt = runtime()
        await asyncio.to_thread(rt.open_dp_socket, self.kernel)
        await asyncio.to_thread(self.kernel.start)
        rt.record("notebook.kernel.start", kernel=self.kernel.key)
        return self.connection_info

    async def poll(self) -> int | None:
        if self.kernel is None:
            return 0
        return await asyncio.to_thread(self.kernel.exit_code)

    async def wait(self) -> int | None:
        while True:
            status = await self.poll()
            if status is not None:
                return status
            await asyncio.sleep(0.1)

    async def send_signal(self, signum: int) -> None:
        if self.kernel is not None:
            await asyncio.to_thread(self.kernel.signal, signum)

    async def shutdown_requested(self, restart: bool = False) -> None:
        if self.kernel is not None:
            await asyncio.to_thread(self.kernel.sample)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        kernel = self.kernel
        if kernel is None:
            return
        rt = runtime()
        await asyncio.to_thread(kernel.remove)
        rt.close_dp_socket(kernel)
        rt.record("notebook.kernel.stop", kernel=kernel.key, restart=restart)
        if not restart:
            await asyncio.to_thread(kernel.remove_folders)
            self.kernel = None

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return 2.0

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return 1.0


def live_kernels(client: Any, *, instance_id: str, contract: str | None = None,
                 notebook: str | None = None) -> list[Any]:
    """This instance's kernel containers, of one contract or one notebook session if given."""
    labels = [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={instance_id}", LABEL_KERNEL]
    if contract:
        labels.append(f"{LABEL_CONTRACT}={contract}")
    if notebook:
        labels.append(f"{LABEL_NOTEBOOK}={notebook}")
    return list(client.containers.list(all=True, filters={"label": labels}))
