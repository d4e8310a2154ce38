"""Notebook kernels on Docker Swarm: each one a job's hardened container, run as a one-replica service.

A kernel is the local runner's kernel container (`runners.kernels.kernel_options`: the job baseline, the
session's workspace at /output, the IPC folder) turned into a service by `runners.swarm.service_arguments`
(restart-condition none, CPU and memory reserved and limited), on an internal overlay network of its own: no
egress, and no other task to talk to. Its image is pulled from the local registry by digest. Service, network
and task container carry the kernel's labels, so `kernels()` finds them and a restarted worker can remove
what nobody owns.

A kernel is a `replicated` service of one replica, as a job is (`service_arguments`), never a
`replicated-job`: on Docker 20.10, removing a replicated-job service leaves its task running, and its
container and task record behind for good
(moby/moby#42789, #44312; seen in the lab), and a kernel ends by being removed far more often than by
exiting. With restart-condition none the one task is still never restarted or replaced, whatever its exit,
and removing the service stops it (SIGTERM, SIGKILL after the stop grace) and removes its container.

As locally, `kernel_status` enforces the time limit (the `org.sandbox.timeout-s` label): past it, the kernel
is killed and reported timed out. A kernel whose node the manager sees down reads as exited (255): whatever
its task's last report said, nothing runs it any more.

The manager cannot signal a task or read its CPU time: both go through the engine of the node the task
runs on (`node_engines`, keyed by the node label `org.sandbox.node`). Where a node's engine is unknown:
- an interrupt (or any signal but SIGTERM and SIGKILL) raises RunnerError: the kernel cannot be interrupted;
- SIGTERM and SIGKILL, and the time limit, end the kernel by removing its service (the swarm stops the
  task): it stops, but its exit code is lost (the kernel then reads as gone, UNKNOWN);
- CPU time is estimated as wall time x the CPUs reserved for it, the most it could have used;
- removal cannot wait for the task's container to be gone from its node.

The kernel talks to its notebook server over ZeroMQ IPC sockets, and to the DP service over a Unix socket,
in folders bind-mounted from the worker's host, as are /code, /data and the workspace. Unix sockets do not
cross machines, and bind mounts need the same path on the node: on several machines, the instance's folders
must be on a shared file system at the same path AND kernels must run on the notebook server's machine
(`constraints=["node.labels.org.sandbox.node==<its node>"]`). In the lab (`runners.swarm_lab`) every node is
a dockerd on this machine, sharing its files and kernel, so a kernel may run on any node. Kernels get no
data-locality constraint of their own (a kernel definition names no dataset version): where versions are
replicated to some nodes only, `constraints` must name a node that holds the session's data.

Stateless like the local runner: a kernel is found by its service's name and labels on every call.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import docker
import docker.errors
import docker.types

from runners.base import (
    LABEL_CONTRACT,
    LABEL_INSTANCE,
    LABEL_KERNEL,
    LABEL_MANAGED,
    LABEL_NOTEBOOK,
    KernelDefinition,
    KernelStatus,
    RunState,
)
from runners.docker import LABEL_TIMEOUT, _explain, _failures, _timestamp, kill_container
from runners.errors import RunnerError
from runners.kernels import _cpu_seconds, kernel_container_name, kernel_labels, kernel_options
from runners.swarm import LABEL_NODE, create_service, service_arguments

# Task states (swarmkit's TaskState) as the runner's states; a task in none of these is prepared.
_RUNNING_TASK = "running"
_ENDED_TASKS = frozenset({"complete", "shutdown", "failed", "rejected", "remove", "orphaned"})
# Before it runs, a task waits in these until a node with room is found: a kernel no node can take now is
# refused after PENDING_LIMIT_S rather than left waiting for a user who is watching a spinner.
_UNPLACED_TASKS = frozenset({"new", "pending"})
START_TIMEOUT_S = 300.0  # from creation to running, a first pull of the image included
PENDING_LIMIT_S = 30.0
GONE_TIMEOUT_S = 30.0  # for a removed kernel's container to leave its node (the swarm removes it)
POLL_S = 0.1
# The exit code reported for a kernel that never had a container (the swarm rejected its task) or was lost
# with its node; and for one past its time limit that was ended by removal, no engine being there to kill it.
EXIT_NO_CONTAINER = 255
EXIT_KILLED = 137


class ImageReferences(Protocol):
    """Where nodes pull an image from (`runners.registry.RegistryImages`)."""

    def reference(self, image_id: str) -> str:
        """`<registry>/<repo>@sha256:<digest>` for a local image id, pushed if it was not yet."""


class SwarmKernelRunner:
    """Kernels as services of a Docker Swarm; implements `runners.base.KernelRunner`."""

    def __init__(self, manager: docker.DockerClient, *, instance_id: str, images: ImageReferences,
                 node_engines: Mapping[str, docker.DockerClient], constraints: Sequence[str] = ()) -> None:
        """`manager`: a manager node's engine. `node_engines`: node label `org.sandbox.node` -> that node's
        engine. `constraints`: placement constraints every kernel gets (see the module's docstring)."""
        if not instance_id:
            raise RunnerError("instance_id must not be empty")
        self.manager: Any = manager
        self.instance_id = instance_id
        self.images = images
        self.node_engines: dict[str, Any] = dict(node_engines)
        self.constraints = list(constraints)

    # --- the KernelRunner steps ---

    def start_kernel(self, kernel: KernelDefinition) -> None:
        """Create the kernel's network and service, and wait until its task runs; a no-op if it exists."""
        options = kernel_options(kernel, instance_id=self.instance_id)
        name = options["name"]
        key = kernel.key
        if self._service(key) is not None:
            return
        with _failures(f"kernel {key}: publishing image {kernel.job.image} to the registry"):
            image_ref = self.images.reference(kernel.job.image)
        arguments = service_arguments(options, image_ref=image_ref, network_id=self._network_for(key, options),
                                      name=name, labels={}, constraints=self.constraints,
                                      generic_gpus=kernel.job.resources.gpus)
        arguments["mode"] = docker.types.ServiceMode("replicated", replicas=1)  # see the module's docstring
        try:
            create_service(self.manager, arguments)
        except docker.errors.APIError as error:
            # Another server process created it between our look and our create: fine if it is ours.
            if not (error.status_code == 409 and self._service(key) is not None):
                raise RunnerError(f"kernel {key}: creating the service failed: {_explain(error)}") from error
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"kernel {key}: creating the service failed: {_explain(error)}") from error
        self._wait_running(key)

    def kernel_status(self, key: str) -> KernelStatus:
        service = self._service(key)
        if service is None:
            return _unknown(key)
        labels = _labels(service)
        task = self._task(service)
        status = self._status(key, labels, task, sample=True)
        timeout_s = int(labels.get(LABEL_TIMEOUT) or 0)
        if (status.state is not RunState.RUNNING or status.started_at is None or not timeout_s
                or time.time() < status.started_at + timeout_s):
            return status
        assert task is not None
        if self._kill(key, task):
            ended = self._status(key, labels, self._task(service), sample=False)
        else:
            self._remove(key, service, task)
            ended = _with(status, state=RunState.EXITED, exit_code=EXIT_KILLED, started_at=None)
        return _with(ended, timed_out=True, cpu_seconds=status.cpu_seconds)

    def signal_kernel(self, key: str, signum: int) -> None:
        service = self._service(key)
        task = self._task(service) if service is not None else None
        if service is None or task is None or _task_state(task) is not RunState.RUNNING:
            return
        node, _ready = self._node(task)
        engine = self.node_engines.get(node)
        if engine is None:
            if signum in (signal.SIGTERM, signal.SIGKILL):
                self._remove(key, service, task)  # what the signal asks for, less the exit code
                return
            raise RunnerError(f"kernel {key}: runs on node {node or task.get('NodeID')!r}, whose engine this worker "
                              f"cannot reach: it cannot be sent {_signal_name(signum)}, so it cannot be interrupted")
        try:
            engine.containers.get(_container_id(task)).kill(signal=signum)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as error:
            if error.status_code != 409:  # 409: it stopped in between
                raise RunnerError(f"kernel {key}: signalling failed: {_explain(error)}") from error
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"kernel {key}: signalling failed: {_explain(error)}") from error

    def remove_kernel(self, key: str) -> KernelStatus:
        """Remove the kernel's service and network (and wait for its container to leave its node)."""
        service = self._service(key)
        if service is None:
            self._remove_network(key)  # a start that died between network and service
            return _unknown(key)
        task = self._task(service)
        # Sampled first: once the container is gone, so is its cgroup.
        last = self._status(key, _labels(service), task, sample=True)
        self._remove(key, service, task)
        return last

    def kernels(self, *, notebook: str | None = None, contract: str | None = None) -> list[KernelStatus]:
        """This instance's kernels (services, ended ones too), and as UNKNOWN any network left without one."""
        labels = kernel_labels(self.instance_id, notebook=notebook, contract=contract)
        with _failures("listing this instance's kernels"):
            services = self.manager.api.services(filters={"label": labels})
            # Tasks match their service's labels: one call for all of them.
            tasks = self.manager.api.tasks(filters={"label": labels})
            networks = self.manager.api.networks(filters={"label": labels})
        latest: dict[str, dict[str, Any]] = {}
        for task in tasks:
            held = latest.get(task["ServiceID"])
            if held is None or _task_order(task) > _task_order(held):
                latest[task["ServiceID"]] = task
        statuses = []
        for service in services:
            service_labels = _labels(service)
            statuses.append(self._status(service_labels[LABEL_KERNEL], service_labels, latest.get(service["ID"]),
                                         sample=False))
        named = {status.key for status in statuses}
        for network in networks:
            network_labels = network.get("Labels") or {}
            key = str(network_labels[LABEL_KERNEL])
            if key not in named:
                named.add(key)
                statuses.append(_unknown(key, network_labels))
        return statuses

    # --- helpers ---

    def _service(self, key: str) -> dict[str, Any] | None:
        """The kernel's service if it exists and this instance owns it; None if there is none."""
        name = kernel_container_name(key)
        with _failures(f"kernel {key}: inspecting service {name}"):
            found: list[dict[str, Any]] = [s for s in self.manager.api.services(filters={"name": name})
                                           if s["Spec"]["Name"] == name]
        if not found:
            return None
        _check_owned(_labels(found[0]), self.instance_id, f"kernel {key}: a service named {name}")
        return found[0]

    def _task(self, service: dict[str, Any]) -> dict[str, Any] | None:
        """The service's task (restart-condition none: at most one), None before the orchestrator made it."""
        try:
            tasks = self.manager.api.tasks(filters={"service": service["ID"]})
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"listing the tasks of {service['Spec']['Name']} failed: {_explain(error)}") from error
        return max(tasks, key=_task_order) if tasks else None

    def _node(self, task: dict[str, Any]) -> tuple[str, bool]:
        """The task's node: its `org.sandbox.node` label ('' if none) and whether the manager sees it Ready."""
        node_id = task.get("NodeID")
        if not node_id:
            return "", False
        try:
            node = self.manager.api.inspect_node(node_id)
        except docker.errors.NotFound:
            return "", False
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"inspecting node {node_id} failed: {_explain(error)}") from error
        label = str((node["Spec"].get("Labels") or {}).get(LABEL_NODE, ""))
        return label, node.get("Status", {}).get("State") == "ready"

    def _status(self, key: str, labels: dict[str, str], task: dict[str, Any] | None, *,
                sample: bool) -> KernelStatus:
        """The kernel's status from its task; with `sample`, its CPU time so far, and a node loss noticed."""
        state = _task_state(task)
        exit_code: int | None = None
        started_at: float | None = None
        cpu_seconds = 0.0
        if task is not None and state is RunState.EXITED:
            exit_code = _exit_code(task)
        elif task is not None and state is RunState.RUNNING:
            started_at = _timestamp(task["Status"].get("Timestamp"))
            if sample:
                node, ready = self._node(task)
                if not ready:
                    # Its node is down: the task's last report says running, but nothing runs it any more.
                    return _with(_unknown(key, labels), state=RunState.EXITED, exit_code=EXIT_NO_CONTAINER)
                cpu_seconds = self._cpu_seconds(task, node, labels, started_at)
        return KernelStatus(key=key, notebook=str(labels.get(LABEL_NOTEBOOK, "")),
                            contract=str(labels.get(LABEL_CONTRACT, "")), state=state, exit_code=exit_code,
                            started_at=started_at, cpu_seconds=cpu_seconds)

    def _cpu_seconds(self, task: dict[str, Any], node: str, labels: dict[str, str],
                     started_at: float | None) -> float:
        engine = self.node_engines.get(node)
        if engine is not None:
            try:
                return _cpu_seconds(engine.containers.get(_container_id(task)))
            except docker.errors.NotFound:
                return 0.0
            except (docker.errors.DockerException, OSError) as error:
                raise RunnerError(f"reading the CPU time of {_container_id(task)} on {node} failed: "
                                  f"{_explain(error)}") from error
        # No engine to ask: charge the most it could have used.
        reserved_cpus = _reserved_nano_cpus(task) / 1e9
        return max(0.0, time.time() - started_at) * reserved_cpus if started_at is not None else 0.0

    def _kill(self, key: str, task: dict[str, Any]) -> bool:
        """Kill the task's container through its node's engine and wait until the manager sees it end;
        False, doing nothing, if that engine is unknown."""
        node, _ready = self._node(task)
        engine = self.node_engines.get(node)
        if engine is None:
            return False
        try:
            container = engine.containers.get(_container_id(task))
        except docker.errors.NotFound:
            container = None
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"kernel {key}: finding its container failed: {_explain(error)}") from error
        if container is not None:
            kill_container(container, f"kernel {key}: killing its container")
        # The node reports the exit to the manager a moment later.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            service = self._service(key)
            current = self._task(service) if service is not None else None
            if current is None or _task_state(current) is not RunState.RUNNING:
                break
            time.sleep(POLL_S)
        return True

    def _remove(self, key: str, service: dict[str, Any], task: dict[str, Any] | None) -> None:
        """Remove the service and its network, and wait until the task's container has left its node."""
        try:
            self.manager.api.remove_service(service["ID"])
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"kernel {key}: removing its service failed: {_explain(error)}") from error
        self._remove_network(key)
        container_id = _container_id(task) if task is not None else ""
        node, ready = self._node(task) if task is not None else ("", False)
        engine = self.node_engines.get(node)
        if not container_id or engine is None or not ready:
            return  # nothing to ask: the node stops and removes the container on its own (once it is back)
        # The swarm stops the task with SIGTERM and a grace; a removed kernel is killed at once, as locally.
        with contextlib.suppress(docker.errors.DockerException, OSError):
            engine.api.kill(container_id)
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while True:
            try:
                engine.api.inspect_container(container_id)
            except docker.errors.NotFound:
                return
            except (docker.errors.DockerException, OSError) as error:
                raise RunnerError(f"kernel {key}: checking its container is gone failed: {_explain(error)}") from error
            if time.monotonic() > deadline:
                raise RunnerError(f"kernel {key}: its container {container_id[:12]} is still on node {node} "
                                  f"{GONE_TIMEOUT_S:.0f} s after its service was removed")
            time.sleep(POLL_S)

    def _network_for(self, key: str, options: dict[str, Any]) -> str:
        """The id of a new internal overlay network for the kernel, after removing any an earlier start left.

        Named afresh each time: a node forgets a removed overlay network a while after the manager does, and
        a restarted kernel (same key) on that node would otherwise be handed the old one ("not found").
        """
        self._remove_network(key)
        labels = {label: value for label, value in options["labels"].items()
                  if label in (LABEL_MANAGED, LABEL_INSTANCE, LABEL_KERNEL, LABEL_NOTEBOOK, LABEL_CONTRACT)}
        with _failures(f"kernel {key}: creating its network"):
            created = self.manager.api.create_network(f"{options['name']}-{secrets.token_hex(4)}", driver="overlay",
                                                      internal=True, labels=labels)
        return str(created["Id"])

    def _networks(self, key: str) -> list[dict[str, Any]]:
        labels = [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={self.instance_id}", f"{LABEL_KERNEL}={key}"]
        with _failures(f"kernel {key}: listing its networks"):
            found: list[dict[str, Any]] = self.manager.api.networks(filters={"label": labels})
        return found

    def _remove_network(self, key: str) -> None:
        for network in self._networks(key):
            # The manager may refuse while a stopping task still holds an endpoint: briefly.
            deadline = time.monotonic() + GONE_TIMEOUT_S
            while True:
                try:
                    self.manager.api.remove_network(network["Id"])
                    break
                except docker.errors.NotFound:
                    break
                except docker.errors.APIError as error:
                    if time.monotonic() > deadline:
                        raise RunnerError(f"kernel {key}: removing its network failed: {_explain(error)}") from error
                except (docker.errors.DockerException, OSError) as error:
                    raise RunnerError(f"kernel {key}: removing its network failed: {_explain(error)}") from error
                time.sleep(POLL_S)

    def _wait_running(self, key: str) -> None:
        """Wait until the kernel's task runs; remove the kernel and raise if the swarm ended or cannot place it."""
        started = time.monotonic()
        while True:
            service = self._service(key)
            if service is None:
                raise RunnerError(f"kernel {key}: its service vanished while it started")
            task = self._task(service)
            state = _task_state(task)
            if state is RunState.RUNNING:
                return
            waited = time.monotonic() - started
            unplaced = task is None or task["Status"]["State"] in _UNPLACED_TASKS
            if state is RunState.EXITED or (unplaced and waited > PENDING_LIMIT_S) or waited > START_TIMEOUT_S:
                why = _task_message(task) if task is not None else "no task was created"
                try:
                    self._remove(key, service, task)
                except RunnerError as error:
                    why += f"; removing it failed too: {error}"
                raise RunnerError(f"kernel {key}: the swarm did not start it ({why})")
            time.sleep(POLL_S)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _labels(service: dict[str, Any]) -> dict[str, str]:
    return dict(service["Spec"].get("Labels") or {})


def _check_owned(labels: Mapping[str, str], instance_id: str, what: str) -> None:
    """A service or network of a kernel's name that another instance (or nobody) labelled is never adopted."""
    if labels.get(LABEL_MANAGED) != "1" or labels.get(LABEL_INSTANCE) != instance_id:
        raise RunnerError(f"{what} exists but this instance does not own it")


def _task_state(task: dict[str, Any] | None) -> RunState:
    """A task's observed state as the runner's state (a service with no task yet is prepared)."""
    if task is None:
        return RunState.PREPARED
    observed = task["Status"]["State"]
    if observed == _RUNNING_TASK:
        return RunState.RUNNING
    if observed in _ENDED_TASKS:
        return RunState.EXITED
    return RunState.PREPARED


def _task_order(task: dict[str, Any]) -> tuple[int, str]:
    return int(task.get("Version", {}).get("Index", 0)), str(task.get("CreatedAt", ""))


def _container_id(task: dict[str, Any]) -> str:
    return str((task["Status"].get("ContainerStatus") or {}).get("ContainerID") or "")


def _exit_code(task: dict[str, Any]) -> int:
    """The ended task's exit code; EXIT_NO_CONTAINER when it has none to tell (never ran, lost with its node)."""
    code = int((task["Status"].get("ContainerStatus") or {}).get("ExitCode") or 0) if _container_id(task) else 0
    if code == 0 and task["Status"]["State"] != "complete":
        return EXIT_NO_CONTAINER  # only a completed task exited 0: an orphaned or rejected one reports 0 too
    return code


def _task_message(task: dict[str, Any]) -> str:
    status = task["Status"]
    return f"task {status['State']}: {status.get('Err') or status.get('Message') or 'no reason given'}"


def _reserved_nano_cpus(task: dict[str, Any]) -> int:
    resources = task.get("Spec", {}).get("Resources") or {}
    return int((resources.get("Reservations") or {}).get("NanoCPUs") or 0)


def _unknown(key: str, labels: Mapping[str, str] | None = None) -> KernelStatus:
    labels = labels or {}
    return KernelStatus(key=key, notebook=str(labels.get(LABEL_NOTEBOOK, "")),
                        contract=str(labels.get(LABEL_CONTRACT, "")), state=RunState.UNKNOWN)


def _with(status: KernelStatus, **changes: Any) -> KernelStatus:
    return replace(status, **changes)
