"""Notebook kernels on the local Docker engine: each one a job's hardened, network-less container.

The container is the job baseline (`runners.docker.container_options`: read-only root, no capabilities,
non-root user, pids, memory and CPU limits, `/data` by tier, the DP socket at /run/sandbox), with the
session's workspace as its /output and working folder, and one more folder, IPC_DIR, where the kernel
binds its ZeroMQ IPC sockets for the notebook server (`transport="ipc"`): the container has no network.

Stateless like `DockerRunner`: a kernel is found by its container's name and labels on every call.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

import docker
import docker.errors
import docker.types

from runners.base import (
    LABEL_CONTRACT,
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_KERNEL,
    LABEL_MANAGED,
    LABEL_NOTEBOOK,
    KernelDefinition,
    KernelStatus,
    RunState,
)
from runners.cgroup_usage import read_cgroup_usage
from runners.docker import (
    _RUNNING_STATES,
    LABEL_TIMEOUT,
    _explain,
    _stats_usage,
    _timestamp,
    container_options,
    owned_container,
    run_state_of,
)
from runners.errors import RunnerError

KERNEL_PREFIX = "sandbox-kernel-"
IPC_DIR = "/run/kernel"  # inside the container: the connection file and the kernel's IPC sockets

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def kernel_container_name(key: str) -> str:
    return KERNEL_PREFIX + key


def kernel_options(kernel: KernelDefinition, *, instance_id: str) -> dict[str, Any]:
    """The `containers.create` arguments for `kernel`: the job baseline, relabelled, with the IPC folder."""
    if not _KEY.fullmatch(kernel.key):
        raise RunnerError(f"kernel key {kernel.key!r} is not allowed: letters, digits, '_', '.', '-' only")
    options = container_options(kernel.job, instance_id=instance_id, output_dir=kernel.workspace)
    options["name"] = kernel_container_name(kernel.key)
    options["working_dir"] = "/output"
    labels = options["labels"]
    labels.pop(LABEL_JOB)  # not a job: the job reconciliation must leave it alone
    labels.update({LABEL_KERNEL: kernel.key, LABEL_NOTEBOOK: kernel.notebook, LABEL_CONTRACT: kernel.contract})
    options["mounts"].append(docker.types.Mount(target=IPC_DIR, source=str(kernel.ipc_dir), type="bind",
                                                read_only=False))
    return options


def kernel_labels(instance_id: str, *, notebook: str | None = None, contract: str | None = None) -> list[str]:
    """The label filter for this instance's kernels, of one session or one contract if given."""
    labels = [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={instance_id}", LABEL_KERNEL]
    if notebook:
        labels.append(f"{LABEL_NOTEBOOK}={notebook}")
    if contract:
        labels.append(f"{LABEL_CONTRACT}={contract}")
    return labels


class DockerKernelRunner:
    """Kernels as containers of the local Docker engine; implements `runners.base.KernelRunner`."""

    def __init__(self, *, instance_id: str, client: docker.DockerClient | None = None) -> None:
        if not instance_id:
            raise RunnerError("instance_id must not be empty")
        self.instance_id = instance_id
        if client is None:
            try:
                client = docker.from_env()
            except (docker.errors.DockerException, OSError) as error:
                raise RunnerError(f"connecting to the Docker engine failed: {_explain(error)}") from error
        self.client: Any = client

    def start_kernel(self, kernel: KernelDefinition) -> None:
        if self._container(kernel.key) is not None:
            return
        options = kernel_options(kernel, instance_id=self.instance_id)
        try:
            self.client.containers.create(**options).start()
        except docker.errors.ImageNotFound as error:
            raise RunnerError(f"kernel {kernel.key}: image {kernel.job.image} is not in the local Docker engine"
                              ) from error
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"kernel {kernel.key}: starting the container failed: {_explain(error)}") from error

    def kernel_status(self, key: str) -> KernelStatus:
        container = self._container(key)
        if container is None:
            return KernelStatus(key=key, notebook="", contract="", state=RunState.UNKNOWN)
        state = container.attrs["State"]
        timed_out = False
        cpu_seconds = 0.0
        if state["Status"] in _RUNNING_STATES:
            cpu_seconds = _cpu_seconds(container)
            started_at = _timestamp(state.get("StartedAt"))
            timeout_s = int((container.labels or {}).get(LABEL_TIMEOUT) or 0)
            if started_at is not None and timeout_s and time.time() >= started_at + timeout_s:
                timed_out = True
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    container.kill()
                    container.wait(timeout=30)
                    container.reload()
                state = container.attrs["State"]
        return _status(key, container.labels or {}, state, timed_out=timed_out, cpu_seconds=cpu_seconds)

    def signal_kernel(self, key: str, signum: int) -> None:
        container = self._container(key)
        if container is None or container.status not in _RUNNING_STATES:
            return
        try:
            container.kill(signal=signum)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as error:
            if error.status_code != 409:  # 409: it stopped in between
                raise RunnerError(f"kernel {key}: signalling failed: {_explain(error)}") from error

    def remove_kernel(self, key: str) -> KernelStatus:
        container = self._container(key)
        if container is None:
            return KernelStatus(key=key, notebook="", contract="", state=RunState.UNKNOWN)
        state = container.attrs["State"]
        # Sampled first: once the container is gone, so is its cgroup.
        cpu_seconds = _cpu_seconds(container) if state["Status"] in _RUNNING_STATES else 0.0
        last = _status(key, container.labels or {}, state, cpu_seconds=cpu_seconds)
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"kernel {key}: removing the container failed: {_explain(error)}") from error
        return last

    def kernels(self, *, notebook: str | None = None, contract: str | None = None) -> list[KernelStatus]:
        labels = kernel_labels(self.instance_id, notebook=notebook, contract=contract)
        try:
            # The low-level list carries labels already; the high-level one inspects every container.
            found = self.client.api.containers(all=True, filters={"label": labels})
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"listing this instance's kernels failed: {_explain(error)}") from error
        statuses = []
        for container in found:
            container_labels = container.get("Labels") or {}
            statuses.append(_status(str(container_labels[LABEL_KERNEL]), container_labels,
                                    {"Status": container.get("State", "")}))
        return statuses

    def _container(self, key: str) -> Any:
        return owned_container(self.client, kernel_container_name(key), instance_id=self.instance_id,
                               what=f"kernel {key}")


def _cpu_seconds(container: Any) -> float:
    usage = read_cgroup_usage(int(container.attrs["State"].get("Pid") or 0), str(container.id))
    if usage is None:
        usage = _stats_usage(container)
    return usage.cpu_seconds if usage is not None else 0.0


def _status(key: str, labels: dict[str, str], state: dict[str, Any], *, timed_out: bool = False,
            cpu_seconds: float = 0.0) -> KernelStatus:
    run_state = run_state_of(str(state.get("Status") or ""))
    exited = run_state is RunState.EXITED
    return KernelStatus(
        key=key, notebook=str(labels.get(LABEL_NOTEBOOK, "")), contract=str(labels.get(LABEL_CONTRACT, "")),
        state=run_state, exit_code=int(state.get("ExitCode") or 0) if exited else None, timed_out=timed_out,
        started_at=_timestamp(state.get("StartedAt")) if state.get("StartedAt") else None, cpu_seconds=cpu_seconds,
    )
