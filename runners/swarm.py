"""Docker Swarm as a job runner: each job a one-shot service on its own internal overlay network.

The job's container is the local runner's (`runners.docker.container_options`, the hardening baseline),
turned into service arguments by `service_arguments`. A job is a `replicated` service of one replica
with restart-condition none (not `replicated-job`: on Docker 20.10 removing a running job-mode service
leaves its task running, and finished job-mode tasks keep their reservations; see docs/scaling.md), with
CPU and memory reserved and limited, placed by constraints on node labels,
its image pulled from the local registry by digest. GPUs are those nodes advertise as the generic
resource NVIDIA-GPU; the runner hands them out itself (see `service_arguments` for why the swarm cannot).

Like `DockerRunner`, nothing lives in memory between calls. A job's state is re-derived on every call
from its service and task (found by labels on the manager) and from `state_dir/<job_id>/`:

    output.img    the job's /output file system (the local runner's quota, `runners.output_quota`)
    output/       where it is loop-mounted, bound into the task at /output
    status.json   what the swarm cannot tell after the fact: started, timed out, terminated, lost, usage
    stdout.log, stderr.log   the logs, kept when the task ends: its service is removed then (see `_retire`)

Shared files. The task binds host paths: /code, /data, /output, the DP socket's folder. In the lab every
node shares this machine's files; on several machines those folders (the instance's artifacts, this
runner's state_dir, the DP socket root) must be on a shared file system mounted at the same path on
every node and on the worker's machine. The runner cannot check that; a node without them fails the task.

Data locality. In "replicated" data mode, a job whose /data comes from dataset version `<dataset>.v<N>`
(`JobDefinition.data_version`) is constrained to nodes labelled `org.sandbox.data.<dataset>.v<N>=1`, which
an operator sets after copying the version there; a job no Ready node can take is refused at prepare. In
"shared" mode (versions served from a shared read-only volume) every node holds every version, so no
constraint is needed and the runner labels nothing: every node update makes the swarm's constraint
enforcer re-check, and on Docker 20.10 wrongly reject, tasks on that node (see `_retire`).

Usage. With the engine of the task's node (`node_engines`, keyed by the node label org.sandbox.node) the
runner samples the task's CPU time and peak memory from that engine's stats, as the local runner does.
Without it, CPU seconds are estimated as wall time x the CPUs reserved, and `RunStatus.usage_estimated`
says so. Stopping a task (timeout, terminate) likewise kills its container through its node engine;
without one the runner removes the service. Either way an ended task's service is removed at once, its
exit and bounded logs kept in the state folder for `collect`.

Node loss. A task whose node goes Down while the task is starting or running, or that the swarm itself
ended or replaced after it may have started (a drained node, its constraint enforcer), is reported once,
for good, as `RunStatus.lost` (the reason); the worker fails or reruns the job by its policy. A task the
swarm refused before it started is asked for again (twice at most): nothing of the job ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import docker
import docker.errors
import docker.types

from runners.base import (
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_MANAGED,
    Collected,
    CollectedFile,
    JobDefinition,
    RunState,
    RunStatus,
)
from runners.docker import (
    _JOB_ID,
    CONTAINER_PREFIX,
    LABEL_GPUS,
    LABEL_LOG_BYTES,
    LABEL_TIMEOUT,
    OUTPUT_FULL_BYTES,
    SANDBOX_USER,
    _explain,
    _failures,
    _sha256,
    _stats_usage,
    _timestamp,
    _write_atomically,
    bounded_log,
    container_options,
    copy_job_outputs,
    kill_container,
    validate_job,
    validate_job_id,
)
from runners.errors import JobNotPreparedError, RunnerError
from runners.output_quota import MIB, ensure_mounted, image_path, is_mounted, mount_path, remove, space_left

__all__ = ["GENERIC_GPU", "LABEL_NODE", "DataMode", "ImageReferences", "SwarmCapacity", "SwarmRunner",
           "create_service", "data_label", "service_arguments"]

# The swarm generic resource a GPU node advertises (`dockerd --node-generic-resource NVIDIA-GPU=<id>`).
GENERIC_GPU = "NVIDIA-GPU"
# The node label naming each node, as node engines are keyed (`swarm_node_engines`).
LABEL_NODE = "org.sandbox.node"
# How long a task has between SIGTERM and SIGKILL when its service is removed: the local runner's grace.
STOP_GRACE_NS = 2_000_000_000

# Nodes labelled `<DATA_LABEL_PREFIX><dataset>.v<N>=1` hold that dataset version.
DATA_LABEL_PREFIX = "org.sandbox.data."
# What a node engine's `info()` must report before the runner trusts it with tasks: a private cgroup
# namespace, which the service API cannot ask for per task (see `service_arguments`). A 20.10 engine does
# not report its --no-new-privileges default (newer ones list "name=no-new-privileges"), so that one is
# the lab's and the operator's to set; tests/swarm/test_swarm_jobs.py checks it inside a running task.
REQUIRED_NODE_SECURITY = ("name=cgroupns",)
STATUS_FILE = "status.json"
LOG_SNAPSHOT = "{stream}.log"
# Swarm service and network names: DNS labels of at most 63 characters.
_NAME_LIMIT = 63
_PLAIN_NAME = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")
_DATA_VERSION = re.compile(r"[a-z][a-z0-9_-]{1,62}\.v[0-9]{1,9}")
_BEFORE_RUNNING = frozenset({"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready",
                             "starting"})
_NODE_GONE = frozenset({"down", "disconnected"})
_NODE_CALL_TIMEOUT_S = 10
# A network stays "in use" for a moment after its service is removed, until the node drops the task.
NETWORK_REMOVE_WAIT_S = 15.0
# How long a task that ended before it started may wait for the swarm to put a new one in its place.
REPLACE_WAIT_S = 10.0
MAX_REISSUES = 2

# The node whose GPUs (LABEL_GPUS, the ids) a service holds.
LABEL_GPU_NODE = "org.sandbox.gpu-node"
# A GPU id as a node advertises it, as NVIDIA_VISIBLE_DEVICES will carry it: no comma, no space.
_GPU_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")

DataMode = Literal["shared", "replicated"]

_TMPFS_SIZE = re.compile(r"size=(\d+)([kmg]?)")
_TMPFS_MODE = re.compile(r"mode=([0-7]{3,4})")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_MEMORY = re.compile(r"(\d+)([kmg]?)")


def service_arguments(options: dict[str, Any], *, image_ref: str, network_id: str, name: str,
                      labels: dict[str, str], constraints: list[str], generic_gpus: int,
                      gpu_ids: Sequence[str] = ()) -> dict[str, Any]:
    """The Swarm service for the container `options` describe (`container_options`, `kernel_options`).

    Create it with `create_service(client, arguments)`: the arguments carry `ulimits`, which docker-py's
    `services.create` has no parameter for (the engine's API 1.41 has: `ContainerSpec.Ulimits`), so
    `services.create(**arguments)` refuses them rather than silently dropping three limits.

    How each part of the local baseline maps (checked on Docker 20.10.24 / API 1.41, in the lab):

    - image: `image_ref`, the same image id pushed to the registry and pinned by digest.
    - command, hostname, user (10001, non-root), working_dir (as workdir), environment (as env): as is.
    - labels: on the service and on its task container, with `labels` added (service labels name the job
      for reconciliation; container labels let a node's engine be checked for leftovers).
    - network_mode "none": services cannot join "none" (no predefined swarm network of that name). The
      task joins `network_id` instead, an internal overlay network made for this one job: eth0 with no
      default route (no egress), and no other task on it (jobs cannot reach each other).
    - read_only, cap_drop ALL, init: as is (ContainerSpec ReadOnly, CapabilityDrop, Init).
    - privileged False, devices []: services have no such fields; a task is never privileged and gets no
      device but GPUs.
    - security_opt no-new-privileges: NOT in the 20.10 service API (ContainerSpec.Privileges gained
      NoNewPrivileges only in API 1.46). Replaced by the node engines' own default: every node's dockerd
      runs with `--no-new-privileges` (a 20.10 engine does not report it back; the tests check it in a task).
      Even without it, cap_drop ALL empties the bounding set, so a setuid binary gains no capability.
    - ipc_mode private: no service field; the engine default (`--default-ipc-mode`) is private.
    - cgroupns private: no service field; on cgroup v1 the engine default is "host", so node dockerds
      run with `--default-cgroupns-mode private` (`SwarmRunner` refuses a node engine that does not).
    - pids_limit: Resources.Limits.Pids (API 1.41).
    - mem_limit: the memory limit, and the same amount reserved, so the scheduler never overcommits.
    - memswap_limit (= memory: no swap): no service field; swarm lets a task swap as much again as its
      memory. Nodes must run without swap (as Kubernetes nodes do) for a memory bomb to meet the OOM
      killer rather than the disk.
    - nano_cpus: the CPU limit, and the same amount reserved.
    - oom_score_adj 500: no service field (API 1.46 adds one). Reservations equal to limits keep a node
      from holding more job memory than it has, which is what made host pressure likely on one machine.
    - ulimits (nofile, fsize, core 0): ContainerSpec.Ulimits (API 1.41), through `create_service`.
    - tmpfs /tmp: a tmpfs mount with the same size and mode; the engine mounts service tmpfs
      noexec,nosuid,nodev on its own (the flags cannot be given, and need not be).
    - mounts (/code, /data read-only, /output, the DP socket folder, a kernel's IPC folder): the same
      bind mounts. Their host paths must exist on whichever node runs the task: on several machines,
      a shared file system at the same path (in the lab every node shares this machine's files).
    - log_config json-file, max-size, max-file: the task's log driver, same options.
    - auto_remove False, restart_policy no: restart-condition none, one replica (one run, never
      restarted); the service stays, with its logs, until the runner removes it.
    - device_requests (GPUs), one of two ways. `generic_gpus`: reserved from the swarm as the generic
      resource NVIDIA-GPU, which only GPU nodes advertise; the engine tells the task its ids in
      `DOCKER_RESOURCE_NVIDIA-GPU`, which the NVIDIA runtime (the GPU node's default runtime, with
      `swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"` in its config) turns into the task's GPUs. Docker
      20.10 cannot keep such a task: its constraint enforcer rejects every task holding a generic resource
      whenever the node is updated (`HasResource` tested the wrong way round), and attaching a task's own
      overlay network updates the node; seen in the lab, every time. So `SwarmRunner` passes `gpu_ids`:
      GPUs the runner chose itself on one node (a `node.id` constraint in `constraints`), named to the
      NVIDIA runtime in NVIDIA_VISIBLE_DEVICES, with nothing reserved from the swarm. A task with no GPU
      gets NVIDIA_VISIBLE_DEVICES=void, as on a local GPU host: it may land on a GPU node.
    """
    _check_known(options)
    if generic_gpus < 0:
        raise RunnerError(f"service {name}: generic_gpus must not be negative")
    if generic_gpus and gpu_ids:
        raise RunnerError(f"service {name}: GPUs are either reserved from the swarm or chosen, not both")
    requests = options.get("device_requests") or []
    asked = sum(_requested_gpus(request) for request in requests)
    if asked != generic_gpus + len(gpu_ids):
        raise RunnerError(f"service {name}: the container asks for {asked} GPU(s) but "
                          f"{generic_gpus + len(gpu_ids)} are given")
    environment = dict(options["environment"])
    if gpu_ids:
        environment["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    elif generic_gpus == 0:
        environment["NVIDIA_VISIBLE_DEVICES"] = "void"
    elif environment.get("NVIDIA_VISIBLE_DEVICES") == "void":
        raise RunnerError(f"service {name}: a GPU task must not be given NVIDIA_VISIBLE_DEVICES=void")
    memory = _memory_bytes(options["mem_limit"])
    if _memory_bytes(options["memswap_limit"]) != memory:
        raise RunnerError(f"service {name}: only a container with no swap (memswap = memory) can be a service")
    resources = docker.types.Resources(
        cpu_limit=int(options["nano_cpus"]), mem_limit=memory,
        cpu_reservation=int(options["nano_cpus"]), mem_reservation=memory,
        generic_resources={GENERIC_GPU: generic_gpus} if generic_gpus else None,
    )
    resources["Limits"]["Pids"] = int(options["pids_limit"])
    log_config = options["log_config"]
    all_labels = {**options["labels"], **labels}
    return {
        "image": image_ref,
        "command": list(options["command"]),
        "name": name,
        "hostname": options["hostname"],
        "user": options["user"],
        "workdir": options["working_dir"],
        "env": [f"{key}={value}" for key, value in sorted(environment.items())],
        "labels": all_labels,
        "container_labels": dict(all_labels),
        "networks": [network_id],
        "mode": docker.types.ServiceMode("replicated", replicas=1),
        "restart_policy": docker.types.RestartPolicy(condition="none"),
        "resources": resources,
        "constraints": list(constraints),
        "read_only": bool(options["read_only"]),
        "cap_drop": list(options["cap_drop"]),
        "init": bool(options["init"]),
        "mounts": [*options["mounts"], *_tmpfs_mounts(options["tmpfs"])],
        "log_driver": log_config["Type"],
        "log_driver_options": dict(log_config["Config"]),
        "stop_grace_period": STOP_GRACE_NS,
        "ulimits": [dict(ulimit) for ulimit in options["ulimits"]],
    }


def create_service(client: Any, arguments: Mapping[str, Any]) -> Any:
    """Create the service `service_arguments` describes, ulimits included, on the manager `client`."""
    from docker.models.services import _get_create_service_kwargs

    kwargs = dict(arguments)
    ulimits = kwargs.pop("ulimits")
    # docker-py builds the task template; its ContainerSpec has no ulimits, so they are added to it here.
    create = _get_create_service_kwargs("create", kwargs)
    create["task_template"]["ContainerSpec"]["Ulimits"] = [
        {"Name": ulimit["Name"], "Soft": int(ulimit["Soft"]), "Hard": int(ulimit["Hard"])} for ulimit in ulimits]
    created = client.api.create_service(**create)
    return client.services.get(created["ID"])


# Every key `container_options` may set, and whether the service carries it (True) or why it need not
# (a string). A key added to the baseline and not here stops `service_arguments`: it must be mapped first.
_KNOWN_OPTIONS: dict[str, bool | str] = {
    "image": True, "command": True, "name": "the service has its own name", "hostname": True, "user": True,
    "working_dir": True, "environment": True, "labels": True, "network_mode": "an internal overlay network",
    "read_only": True, "cap_drop": True, "security_opt": "node engines run with --no-new-privileges",
    "privileged": "services are never privileged", "devices": "services get no devices",
    "init": True, "ipc_mode": "the engine default is private",
    "cgroupns": "node engines run with --default-cgroupns-mode private", "pids_limit": True, "mem_limit": True,
    "memswap_limit": "nodes run without swap", "nano_cpus": True,
    "oom_score_adj": "reservations equal limits", "ulimits": True, "tmpfs": True, "mounts": True,
    "log_config": True, "auto_remove": "the runner removes the service", "restart_policy": True,
    "device_requests": True,
}


def _check_known(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(_KNOWN_OPTIONS))
    if unknown:
        raise RunnerError(f"container options {unknown} have no Swarm mapping yet: map them in runners/swarm.py")
    expected = {"network_mode": "none", "privileged": False, "devices": [], "ipc_mode": "private",
                "cgroupns": "private", "security_opt": ["no-new-privileges"], "auto_remove": False,
                "restart_policy": {"Name": "no"}}
    for key, value in expected.items():
        if key in options and options[key] != value:
            raise RunnerError(f"container option {key}={options[key]!r} differs from the baseline this "
                              "mapping relies on")


def _requested_gpus(request: Mapping[str, Any]) -> int:
    device_ids = request.get("DeviceIDs") or []
    return len(device_ids) if device_ids else int(request.get("Count") or 0)


def _memory_bytes(value: str | int) -> int:
    if isinstance(value, int):
        return value
    match = _MEMORY.fullmatch(value.strip().lower())
    if match is None:
        raise RunnerError(f"cannot read the memory size {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _tmpfs_mounts(tmpfs: Mapping[str, str]) -> list[docker.types.Mount]:
    mounts = []
    for target, flags in sorted(tmpfs.items()):
        size, mode = _TMPFS_SIZE.search(flags), _TMPFS_MODE.search(flags)
        if size is None or mode is None:
            raise RunnerError(f"tmpfs {target}: give a size and a mode ({flags!r})")
        mounts.append(docker.types.Mount(target=target, source=None, type="tmpfs",
                                         tmpfs_size=int(size.group(1)) * _UNITS[size.group(2)],
                                         tmpfs_mode=int(mode.group(1), 8)))
    return mounts


class ImageReferences(Protocol):
    """Where nodes pull an image of this engine from (`runners.registry.RegistryImages`)."""

    def reference(self, image_id: str) -> str:
        """`<registry>/<repo>@sha256:<digest>` of the local image `image_id`, pushed if need be."""


@dataclass(frozen=True)
class SwarmCapacity:
    """What the swarm's Ready nodes hold together."""

    nodes: int
    cpus: float
    memory_mb: int
    gpus: int


@dataclass
class _PersistedStatus:
    """What `status.json` holds: facts the swarm forgets or never knew."""

    started: bool = False  # the service was created: a missing service since means it vanished
    timed_out: bool = False
    terminated: bool = False
    lost: str | None = None
    started_at: float | None = None  # when the task was first seen running
    finished_at: float | None = None  # set when the runner ended the task itself, or lost it
    exit_code: int | None = None  # of the ended task, kept when the runner removed its service
    oom_killed: bool = False
    reserved_cpus: float = 0.0
    run_task: str | None = None  # the task first seen running: the job's one run
    node: str | None = None  # the node label (org.sandbox.node) of the node its task was last seen on
    reissued: int = 0  # times the runner asked for a task again after the swarm rejected one unstarted
    reissued_at: float = 0.0
    metered: bool = False  # its usage is sampled from its node's engine; else estimated from wall time
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0


@dataclass(frozen=True)
class SwarmEngines:
    """The engines a swarm worker, and each notebook server it starts, talk to; and the images they pin."""

    manager: Any
    node_engines: dict[str, Any]
    images: Any  # runners.registry.RegistryImages


def connect_swarm(*, manager_url: str, registry: str, node_engine_urls: Mapping[str, str],
                  images_dir: Path) -> SwarmEngines:
    """Clients for the manager and the node engines (keyed by node label), and the registry's image pins.

    Job images are built on this machine's engine and pushed by the manager's to the registry the nodes
    pull from; `images_dir` remembers what was pushed.
    """
    from runners.registry import RegistryImages

    if not manager_url or not registry:
        raise RunnerError("the swarm runner needs swarm_manager_url and swarm_registry (SANDBOX_SWARM_*)")
    try:
        manager = docker.DockerClient(base_url=manager_url)
        node_engines = {name: docker.DockerClient(base_url=url) for name, url in node_engine_urls.items()}
        source = docker.from_env()
    except docker.errors.DockerException as exc:
        raise RunnerError(f"connecting to the swarm's engines failed: {exc}") from exc
    images = RegistryImages(source=source, pusher=manager, registry=registry, state_dir=images_dir)
    return SwarmEngines(manager=manager, node_engines=node_engines, images=images)


def data_label(data_version: str) -> str:
    """The node label of nodes that hold `data_version` ("<dataset>.v<N>")."""
    if not _DATA_VERSION.fullmatch(data_version):
        raise RunnerError(f"data version {data_version!r} is not <dataset>.v<N>")
    return DATA_LABEL_PREFIX + data_version


def service_name(job_id: str) -> str:
    """The job's service (and network) name: readable when the job id fits a DNS label, else hashed."""
    name = CONTAINER_PREFIX + job_id
    if _PLAIN_NAME.fullmatch(job_id) and len(name) <= _NAME_LIMIT:
        return name
    readable = re.sub(r"[^A-Za-z0-9]+", "-", job_id).strip("-")[:30]
    return f"{CONTAINER_PREFIX}{readable}-{hashlib.sha256(job_id.encode()).hexdigest()[:16]}".replace("--", "-")


class SwarmRunner:
    """Runs each job as a hardened one-shot service on a Docker swarm; implements `runners.base.JobRunner`."""

    def __init__(
        self,
        manager: Any,
        *,
        state_dir: Path,
        instance_id: str,
        images: ImageReferences,
        node_engines: Mapping[str, Any] | None = None,
        data_mode: DataMode = "shared",
    ) -> None:
        if not instance_id:
            raise RunnerError("instance_id must not be empty")
        if data_mode not in ("shared", "replicated"):
            raise RunnerError(f"data mode must be 'shared' or 'replicated', not {data_mode!r}")
        self.manager: Any = manager
        self.state_dir = Path(os.path.realpath(state_dir))
        self.instance_id = instance_id
        self.images = images
        self.node_engines: dict[str, Any] = dict(node_engines or {})
        self.data_mode: DataMode = data_mode
        self._gpu_lock = threading.Lock()
        self.check_node_engines()

    def check_node_engines(self) -> None:
        """Refuse a node engine whose defaults do not give what the service API cannot ask for."""
        for name, engine in self.node_engines.items():
            with _failures(f"asking node {name}'s engine for its security options"):
                options = engine.info().get("SecurityOptions") or []
            missing = [option for option in REQUIRED_NODE_SECURITY if option not in options]
            if missing:
                raise RunnerError(f"node {name}'s engine lacks {missing}: start its dockerd with "
                                  "--default-cgroupns-mode private and --no-new-privileges (tasks cannot ask "
                                  "for either on Docker 20.10)")

    def capacity(self) -> SwarmCapacity:
        """The CPUs, memory and generic GPUs of the swarm's Ready nodes (drained ones included: they may return)."""
        with _failures("listing the swarm's nodes"):
            nodes = [node.attrs for node in self.manager.nodes.list()]
        ready = [node for node in nodes if node.get("Status", {}).get("State") == "ready"]
        cpus = sum(int(node["Description"]["Resources"].get("NanoCPUs", 0)) for node in ready) / 1e9
        memory = sum(int(node["Description"]["Resources"].get("MemoryBytes", 0)) for node in ready)
        gpus = sum(_node_gpus(node) for node in ready)
        return SwarmCapacity(nodes=len(ready), cpus=cpus, memory_mb=memory // MIB, gpus=gpus)

    # --- the JobRunner steps ---

    def prepare(self, job: JobDefinition) -> None:
        """Create the output quota and the job's network; in replicated data mode, refuse a job no node can take."""
        validate_job(job)
        if job.data_folders:
            # A collection is read in place, from the hospital's own folder: no node but the worker's holds it.
            raise RunnerError(f"job {job.id}: the swarm runner does not mount file collections yet; run jobs on "
                              "file collections with the docker runner, on the machine that holds the folder")
        job_dir = self._job_dir(job.id)
        with _failures(f"job {job.id}: creating {job_dir}"):
            job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            ensure_mounted(job_dir, size_mb=job.resources.output_mb, owner=SANDBOX_USER)
        if self._service(job.id) is not None:
            return
        self._constraints(job)
        self._network(job.id, create=True)
        if not (job_dir / STATUS_FILE).exists():
            self._save_status(job.id, _PersistedStatus())

    def start(self, job: JobDefinition) -> None:
        """Create the job's service, which starts its one task; a no-op if the service exists."""
        validate_job(job)
        persisted = self._load_status(job.id)
        if self._service(job.id) is not None:
            if not persisted.started:
                persisted.started = True
                self._save_status(job.id, persisted)
            return
        job_dir = self._job_dir(job.id)
        if not image_path(job_dir).exists():
            raise JobNotPreparedError(f"job {job.id}: no output file system; call prepare() first")
        if persisted.terminated:
            raise RunnerError(f"job {job.id} was terminated before it started; it will not be started")
        persisted.reserved_cpus = job.resources.cpus
        if persisted.started:
            raise RunnerError(f"job {job.id}: its service was started once and is gone; it is not run again")
        with _failures(f"job {job.id}: mounting the output file system"):
            output_dir = ensure_mounted(job_dir, size_mb=job.resources.output_mb, owner=SANDBOX_USER, create=False)
        network = self._network(job.id, create=True)
        constraints = self._constraints(job)
        reference = self.images.reference(job.image)
        options = container_options(job, instance_id=self.instance_id, output_dir=output_dir,
                                    gpu_ids=None if job.resources.gpus else [])
        # Choosing free GPUs and creating the service that holds them is one step: two jobs started at
        # once must not both pick the same free GPU.
        with self._gpu_lock:
            labels: dict[str, str] = {}
            gpu_ids: list[str] = []
            if job.resources.gpus:
                node_id, gpu_ids = self._free_gpus(job, constraints)
                constraints = [*constraints, f"node.id=={node_id}"]
                labels = {LABEL_GPUS: ",".join(gpu_ids), LABEL_GPU_NODE: node_id}
            arguments = service_arguments(options, image_ref=reference, network_id=network.id,
                                          name=service_name(job.id), labels=labels, constraints=constraints,
                                          generic_gpus=0, gpu_ids=gpu_ids)
            try:
                create_service(self.manager, arguments)
            except docker.errors.APIError as error:
                # Another worker created it between our look and our create: fine if it is ours.
                if error.status_code != 409 or self._service(job.id) is None:
                    raise RunnerError(f"job {job.id}: creating the service failed: {_explain(error)}") from error
            except (docker.errors.DockerException, OSError) as error:
                raise RunnerError(f"job {job.id}: creating the service failed: {_explain(error)}") from error
        # Written after the create: a crash in between leaves a service, which poll finds.
        persisted.started = True
        self._save_status(job.id, persisted)

    def poll(self, job_id: str) -> RunStatus:
        """The job's state and usage; kills it past its time limit, and reports its node's loss."""
        validate_job_id(job_id)
        service = self._service(job_id)
        persisted = self._load_status(job_id)
        output_full = self._output_full(job_id)
        if service is None:
            if persisted.lost is not None or persisted.finished_at is not None:
                return self._status(RunState.EXITED, persisted, output_full, exit_code=persisted.exit_code,
                                    oom_killed=persisted.oom_killed)
            prepared = not persisted.started and image_path(self._job_dir(job_id)).exists()
            return self._status(RunState.PREPARED if prepared else RunState.UNKNOWN, persisted, output_full)
        if persisted.lost is not None:
            return self._status(RunState.EXITED, persisted, output_full)
        tasks = _tasks(service)
        task = tasks[-1] if tasks else None
        state = task["Status"]["State"] if task else "new"
        node = self._node_name(task)
        if node is not None and node != persisted.node:
            persisted.node = node
            self._save_status(job_id, persisted)
        # The swarm replaces a task it shut down itself (a drained node, a node whose labels changed under
        # it). One that never started leaves nothing behind; one that may have run means the job would run
        # twice, which only the worker may decide (the policy's rerun rule): the run counts as lost.
        replaced = [earlier for earlier in tasks[:-1] if _may_have_run(earlier, persisted)]
        lost = (f"the swarm replaced the job's task after it had started ({_describe(replaced[-1])})"
                if replaced else None)
        if lost is None and (state in _BEFORE_RUNNING or state == "running"):
            lost = self._node_lost(task)
        if lost is not None:
            persisted.lost, persisted.finished_at = lost, time.time()
            self._save_status(job_id, persisted)
            return self._status(RunState.EXITED, persisted, output_full)
        if task is not None and state == "running":
            if persisted.started_at is None:
                # Decided once, when it starts: a running total must never drop from an estimate to a sample.
                persisted.started_at = _timestamp(task["Status"].get("Timestamp")) or time.time()
                persisted.metered = self._node_engine(task) is not None
                persisted.run_task = str(task["ID"])
                self._save_status(job_id, persisted)
            self._sample_usage(job_id, task, persisted)
            return self._enforce_time(job_id, service, task, persisted, output_full, since=persisted.started_at)
        created = _timestamp(service.attrs.get("CreatedAt")) or time.time()
        if state in _BEFORE_RUNNING:
            # A task no node can take (no room, no node with the data) waits: its time runs from creation.
            return self._enforce_time(job_id, service, task, persisted, output_full, since=created)
        assert task is not None
        ours = persisted.timed_out or persisted.terminated
        if state in ("complete", "failed") or (state == "shutdown" and ours):
            return self._finished(job_id, service, task, persisted, output_full)
        if not _may_have_run(task, persisted):
            ended = max(_timestamp(task["Status"].get("Timestamp")) or time.time(), persisted.reissued_at)
            waited = time.time() >= ended + REPLACE_WAIT_S
            if waited and persisted.reissued < MAX_REISSUES:
                # The swarm's constraint enforcer rejects a node's tasks when the node changes and they no
                # longer fit beside other services' ended one-shot tasks, which it wrongly still counts
                # (moby/moby#52652): "assigned node no longer meets constraints", and the one-shot service is
                # left without a task. Nothing ran, so the runner asks for it again: a forced update.
                persisted.reissued, persisted.reissued_at = persisted.reissued + 1, time.time()
                self._save_status(job_id, persisted)
                with _failures(f"job {job_id}: asking the swarm for its task again"):
                    _force_new_task(self.manager, service)
                return self._enforce_time(job_id, service, task, persisted, output_full, since=created)
            if not waited:
                return self._enforce_time(job_id, service, task, persisted, output_full, since=created)
            lost = f"the swarm could not start the task ({_describe(task)})"
        else:
            lost = f"the swarm ended the task ({_describe(task)})"
        persisted.lost, persisted.finished_at = lost, time.time()
        self._save_status(job_id, persisted)
        return self._status(RunState.EXITED, persisted, output_full)

    def collect(self, job_id: str, destination: Path) -> Collected:
        """Copy /output's regular files to `destination/files/` and the logs to `destination/logs/`."""
        validate_job_id(job_id)
        service = self._service(job_id)
        task = _latest_task(service) if service is not None else None
        if task is not None and (task["Status"]["State"] in _BEFORE_RUNNING or task["Status"]["State"] == "running"):
            raise RunnerError(f"job {job_id} is still running; collect after it exits")
        destination = Path(os.path.abspath(destination))
        files, refused = copy_job_outputs(job_id, self._job_dir(job_id), destination)
        with _failures(f"job {job_id}: collecting its logs into {destination}"):
            stdout, stderr = self._collect_logs(job_id, service, destination / "logs")
        return Collected(files=files, refused=refused, stdout=stdout, stderr=stderr)

    def terminate(self, job_id: str) -> None:
        """Stop the job's task now and make sure it never starts again."""
        validate_job_id(job_id)
        persisted = self._load_status(job_id)
        if self._job_dir(job_id).is_dir() and not persisted.terminated:
            persisted.terminated = True
            self._save_status(job_id, persisted)
        service = self._service(job_id)
        if service is None or persisted.lost is not None:
            # A lost task died with its node; its logs are out of reach (asking could hang on the node).
            return
        task = _latest_task(service)
        state = task["Status"]["State"] if task else "new"
        if state in _BEFORE_RUNNING or state == "running":
            self._stop(job_id, service, task)

    def cleanup(self, job_id: str) -> None:
        """Remove the service, its network, the output file system and the job's state folder."""
        validate_job_id(job_id)
        service = self._service(job_id)
        if service is not None:
            self._remove_service(job_id, service)
        job_dir = self._job_dir(job_id)
        if job_dir.exists():
            with _failures(f"job {job_id}: removing {job_dir}"):
                remove(job_dir)
                if is_mounted(mount_path(job_dir)):
                    raise RunnerError(f"job {job_id}: {mount_path(job_dir)} is still mounted; not deleting it")
                for child in job_dir.iterdir():
                    child.unlink()
                job_dir.rmdir()
        # Last: the network outlives its task by a moment (or, while the task's node is down, until the
        # swarm gives the task up). One left here is removed by a later managed_jobs().
        network = self._network(job_id, create=False)
        if network is not None:
            _remove_network(network, wait_s=NETWORK_REMOVE_WAIT_S)

    def node_of(self, job_id: str) -> str | None:
        """The node (its org.sandbox.node label) the job's task was last seen on, if any."""
        validate_job_id(job_id)
        return self._load_status(job_id).node

    def managed_jobs(self) -> set[str]:
        """Jobs with a service labelled for this instance or a state folder; removes networks left of others.

        A network whose job has neither is what a cleanup could not remove yet (its task's node was down):
        it is removed here, and never reported, so a job rerun from the queue is not taken for a started one.
        """
        filters = {"label": [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={self.instance_id}", LABEL_JOB]}
        with _failures("listing this instance's networks"):
            networks = self.manager.networks.list(filters=filters)
        with _failures("listing this instance's services"):
            services = self.manager.services.list(filters=filters)
        jobs = {str(s.attrs["Spec"]["Labels"][LABEL_JOB]) for s in services}
        with _failures(f"listing {self.state_dir}"):
            folders = list(self.state_dir.iterdir()) if self.state_dir.is_dir() else []
        jobs |= {folder.name for folder in folders if folder.is_dir() and _JOB_ID.fullmatch(folder.name)}
        for network in networks:
            if str((network.attrs.get("Labels") or {}).get(LABEL_JOB)) not in jobs:
                _remove_network(network, wait_s=0)
        self._remove_orphan_containers(jobs)
        return jobs

    def _remove_orphan_containers(self, jobs: set[str]) -> None:
        """Remove task containers of this instance's jobs that have neither service nor state folder.

        A node that was Down when its task's service was removed keeps the task's (dead) container when it
        returns: its agent does not remove it. Only Ready nodes' engines are asked: a Down one may hang.
        """
        if not self.node_engines:
            return
        with _failures("listing the swarm's nodes"):
            ready = {_node_label(node.attrs) for node in self.manager.nodes.list()
                     if node.attrs.get("Status", {}).get("State") == "ready"}
        filters = {"label": [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={self.instance_id}", LABEL_JOB]}
        for name, engine in self.node_engines.items():
            if name not in ready:
                continue
            with contextlib.suppress(docker.errors.DockerException, OSError):
                for container in engine.api.containers(all=True, filters=filters):
                    if str((container.get("Labels") or {}).get(LABEL_JOB)) not in jobs:
                        engine.api.remove_container(container["Id"], force=True)

    # --- helpers ---

    def _job_dir(self, job_id: str) -> Path:
        return self.state_dir / job_id

    def _labels(self, job_id: str) -> list[str]:
        return [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={self.instance_id}", f"{LABEL_JOB}={job_id}"]

    def _service(self, job_id: str) -> Any:
        """The job's service on the manager, or None; found by name, and refused unless this instance labelled it."""
        name = service_name(job_id)
        with _failures(f"job {job_id}: looking up service {name}"):
            found = [s for s in self.manager.services.list(filters={"name": name}) if s.name == name]
        if not found:
            return None
        labels = found[0].attrs["Spec"].get("Labels") or {}
        if labels.get(LABEL_MANAGED) != "1" or labels.get(LABEL_INSTANCE) != self.instance_id \
                or labels.get(LABEL_JOB) != job_id:
            raise RunnerError(f"job {job_id}: a service named {name} exists but this instance does not own it")
        return found[0]

    def _network(self, job_id: str, *, create: bool) -> Any:
        """The job's own internal overlay network (no egress, no other job on it); made if `create`."""
        name = service_name(job_id)
        with _failures(f"job {job_id}: looking up network {name}"):
            found = [n for n in self.manager.networks.list(names=[name]) if n.name == name]
        if found:
            labels = found[0].attrs.get("Labels") or {}
            if labels.get(LABEL_MANAGED) != "1" or labels.get(LABEL_INSTANCE) != self.instance_id:
                raise RunnerError(f"job {job_id}: a network named {name} exists but this instance does not own it")
            return found[0]
        if not create:
            return None
        labels = {LABEL_MANAGED: "1", LABEL_INSTANCE: self.instance_id, LABEL_JOB: job_id}
        with _failures(f"job {job_id}: creating network {name}"):
            return self.manager.networks.create(name, driver="overlay", internal=True, attachable=False,
                                                labels=labels)

    def _constraints(self, job: JobDefinition) -> list[str]:
        """Placement: in replicated data mode, only nodes labelled as holding the job's data version."""
        if job.data_version is None or not job.data_files:
            return []
        label = data_label(job.data_version)
        if self.data_mode == "shared":
            # Every node holds every version. Labelling the nodes to say so would be worse than useless:
            # Docker 20.10's constraint enforcer re-checks a node's tasks whenever the node is updated, and
            # rejects its GPU tasks, running ones included (seen in the lab: "assigned node no longer meets
            # constraints"), so the runner never updates a node.
            return []
        with _failures(f"job {job.id}: listing the swarm's nodes"):
            nodes = [node for node in self.manager.nodes.list()
                     if node.attrs.get("Status", {}).get("State") == "ready"]
        if not any((node.attrs["Spec"].get("Labels") or {}).get(label) == "1" for node in nodes):
            raise RunnerError(f"job {job.id}: no Ready node holds {job.data_version} (node label {label}=1); "
                              "replicate the version to a node and label it")
        return [f"node.labels.{label}==1"]

    def _free_gpus(self, job: JobDefinition, constraints: list[str]) -> tuple[str, list[str]]:
        """A Ready, active node (holding the job's data, if constrained to) with `job.resources.gpus` GPUs that
        no live service holds, and those GPUs' ids.

        Read from the swarm, never from memory: every service labelled with GPUs holds them until it is
        removed (the runner removes a service as soon as its task ends), whichever instance made it.
        """
        wanted = job.resources.gpus
        with _failures(f"job {job.id}: listing the nodes and the services that hold GPUs"):
            nodes = [node.attrs for node in self.manager.nodes.list()]
            holding = self.manager.api.services(filters={"label": [f"{LABEL_MANAGED}=1", LABEL_GPUS]})
        held = {(str(labels.get(LABEL_GPU_NODE)), device)
                for labels in (service["Spec"].get("Labels") or {} for service in holding)
                for device in str(labels.get(LABEL_GPUS, "")).split(",") if device}
        data = [c.removeprefix("node.labels.").removesuffix("==1") for c in constraints if c.startswith("node.labels.")]
        for node in sorted(nodes, key=_node_label):
            if node.get("Status", {}).get("State") != "ready" or node["Spec"].get("Availability") != "active":
                continue
            if any((node["Spec"].get("Labels") or {}).get(label) != "1" for label in data):
                continue
            free = [device for device in _node_gpu_ids(node) if (node["ID"], device) not in held]
            if len(free) >= wanted:
                return str(node["ID"]), free[:wanted]
        raise RunnerError(f"job {job.id}: needs {wanted} GPU(s) on one node, and no Ready node has that many free")

    def _node(self, task: dict[str, Any] | None) -> dict[str, Any] | None:
        """The manager's view of the node `task` is assigned to; None if unassigned. Raises NotFound if it left."""
        node_id = (task or {}).get("NodeID")
        if not node_id:
            return None
        try:
            node: dict[str, Any] = self.manager.nodes.get(node_id).attrs
        except docker.errors.NotFound:
            raise
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"looking up node {node_id} failed: {_explain(error)}") from error
        return node

    def _node_lost(self, task: dict[str, Any] | None) -> str | None:
        """Why the task's node counts as lost (Down or disconnected), or None while it is up or unassigned."""
        try:
            node = self._node(task)
        except docker.errors.NotFound:
            return f"the task's node {(task or {}).get('NodeID')} left the swarm mid-job"
        status = (node or {}).get("Status", {})
        if node is None or status.get("State") not in _NODE_GONE:
            return None
        detail = f" ({status['Message']})" if status.get("Message") else ""
        return f"node lost: {_node_label(node)} went {status['State']} mid-job{detail}"

    def _node_name(self, task: dict[str, Any] | None) -> str | None:
        with contextlib.suppress(docker.errors.NotFound, RunnerError):
            node = self._node(task)
            return _node_label(node) if node is not None else None
        return None

    def _node_engine(self, task: dict[str, Any] | None) -> Any:
        """The engine of the node running `task`, if the runner has it and the node is Ready."""
        if not self.node_engines:
            return None
        try:
            node = self._node(task)
        except (docker.errors.NotFound, RunnerError):
            return None
        if node is None or node.get("Status", {}).get("State") != "ready":
            return None
        return self.node_engines.get((node["Spec"].get("Labels") or {}).get(LABEL_NODE, ""))

    def _task_container(self, task: dict[str, Any] | None) -> Any:
        engine = self._node_engine(task)
        container_id = ((task or {}).get("Status", {}).get("ContainerStatus") or {}).get("ContainerID")
        if engine is None or not container_id:
            return None
        try:
            return engine.containers.get(container_id)
        except (docker.errors.DockerException, OSError):
            return None

    def _sample_usage(self, job_id: str, task: dict[str, Any], persisted: _PersistedStatus) -> None:
        container = self._task_container(task)
        usage = _stats_usage(container) if container is not None else None
        if usage is None:
            return
        cpu_seconds = max(persisted.cpu_seconds, usage.cpu_seconds)
        peak = max(persisted.peak_memory_bytes, usage.peak_memory_bytes)
        if (cpu_seconds, peak) != (persisted.cpu_seconds, persisted.peak_memory_bytes):
            persisted.cpu_seconds, persisted.peak_memory_bytes = cpu_seconds, peak
            self._save_status(job_id, persisted)

    def _enforce_time(self, job_id: str, service: Any, task: dict[str, Any] | None, persisted: _PersistedStatus,
                      output_full: bool, *, since: float) -> RunStatus:
        timeout_s = _label_int(service, LABEL_TIMEOUT)
        if time.time() >= since + timeout_s and not persisted.timed_out and not persisted.terminated:
            # Written before the kill: a crash in between must not forget why the job died.
            persisted.timed_out = True
            self._save_status(job_id, persisted)
        if persisted.timed_out or persisted.terminated:
            self._stop(job_id, service, task)
            return self.poll(job_id)
        return self._status(RunState.RUNNING, persisted, output_full)

    def _stop(self, job_id: str, service: Any, task: dict[str, Any] | None) -> None:
        """Kill the task's container through its node's engine; without one, keep the logs and remove the service."""
        container = self._task_container(task)
        if container is not None:
            kill_container(container, f"job {job_id}: killing its task")
            if self._wait_task_ends(service):
                return
        running = task is not None and task["Status"]["State"] == "running"
        # SIGKILL, as the local runner's kill reports it; None for a task that never started.
        self._retire(job_id, service, exit_code=137 if running else None, oom_killed=False, finished_at=time.time())

    def _wait_task_ends(self, service: Any, wait_s: float = 30.0) -> bool:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with _failures(f"service {service.name}: listing its tasks"):
                task = _latest_task(service)
            if task is None or task["Status"]["State"] not in _BEFORE_RUNNING | {"running"}:
                return True
            time.sleep(0.1)
        return False

    def _finished(self, job_id: str, service: Any, task: dict[str, Any], persisted: _PersistedStatus,
                  output_full: bool) -> RunStatus:
        """The status of a task that exited (or that the runner stopped), its service retired."""
        status = task["Status"]
        container_status = status.get("ContainerStatus") or {}
        exit_code = int(container_status.get("ExitCode", 0 if status["State"] == "complete" else 137))
        container = self._task_container(task)
        oom = bool(container is not None and container.attrs["State"].get("OOMKilled"))
        if persisted.started_at is None:
            # It ran and ended between two polls: its node's engine still knows when it started; without
            # the engine, the service's creation is the latest start that is sure not to undercharge.
            started = _timestamp(container.attrs["State"].get("StartedAt")) if container is not None else None
            persisted.started_at = started or _timestamp(service.attrs.get("CreatedAt"))
            persisted.metered = container is not None
            self._save_status(job_id, persisted)
        finished_at = persisted.finished_at or _timestamp(status.get("Timestamp")) or time.time()
        self._retire(job_id, service, exit_code=exit_code, oom_killed=oom, finished_at=finished_at)
        return self.poll(job_id)

    def _retire(self, job_id: str, service: Any, *, exit_code: int | None, oom_killed: bool,
                finished_at: float) -> None:
        """Keep what the swarm knows of an ended task (its exit, its logs), then remove its service now.

        Not at cleanup: until a one-shot service is removed, the swarm's constraint enforcer counts its
        ended task's reservations (CPU, memory, GPUs) against the node, and rejects tasks that would not
        fit beside them, running ones included (moby/moby#52652; seen in the lab within two jobs).
        """
        persisted = self._load_status(job_id)
        job_dir = self._job_dir(job_id)
        if job_dir.is_dir():
            limit = _label_int(service, LABEL_LOG_BYTES)
            for stream in ("stdout", "stderr"):
                with _failures(f"job {job_id}: keeping its {stream}"):
                    _write_atomically(job_dir / LOG_SNAPSHOT.format(stream=stream),
                                      _service_log(service, stream, limit))
        persisted.exit_code, persisted.oom_killed, persisted.finished_at = exit_code, oom_killed, finished_at
        self._save_status(job_id, persisted)
        self._remove_service(job_id, service)

    def _remove_service(self, job_id: str, service: Any) -> None:
        """Remove the service, and its task containers now where the runner has their node's engine."""
        with _failures(f"job {job_id}: listing its tasks"):
            tasks = _tasks(service)
        try:
            service.remove()
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"job {job_id}: removing the service failed: {_explain(error)}") from error
        # A node's agent removes a removed service's containers only on a later pass (about 30 s in the
        # lab); with the node's engine they go now. A Down node's go when it returns.
        for task in tasks:
            container = self._task_container(task)
            if container is not None:
                with contextlib.suppress(docker.errors.DockerException, OSError):
                    container.remove(force=True)

    def _status(self, state: RunState, persisted: _PersistedStatus, output_full: bool, *,
                exit_code: int | None = None, oom_killed: bool = False) -> RunStatus:
        started, finished = persisted.started_at, persisted.finished_at if state is RunState.EXITED else None
        estimated = started is not None and not persisted.metered
        cpu_seconds = persisted.cpu_seconds
        if estimated and started is not None:
            # No engine to ask: the reservation held for the wall time is what is charged.
            cpu_seconds = max((finished or time.time()) - started, 0.0) * persisted.reserved_cpus
        return RunStatus(
            state=state,
            exit_code=exit_code if state is RunState.EXITED else None,
            oom_killed=oom_killed,
            timed_out=persisted.timed_out,
            output_full=output_full,
            started_at=started,
            finished_at=finished if state is RunState.EXITED else None,
            cpu_seconds=cpu_seconds,
            peak_memory_bytes=persisted.peak_memory_bytes,
            lost=persisted.lost,
            usage_estimated=estimated,
        )

    def _output_full(self, job_id: str) -> bool:
        mountpoint = mount_path(self._job_dir(job_id))
        if not is_mounted(mountpoint):
            return False
        free_bytes, free_inodes = space_left(mountpoint)
        return free_bytes < OUTPUT_FULL_BYTES or free_inodes == 0

    def _collect_logs(self, job_id: str, service: Any, folder: Path) -> tuple[CollectedFile, CollectedFile]:
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        collected: list[CollectedFile] = []
        for stream in ("stdout", "stderr"):
            target = folder / f"{stream}.txt"
            snapshot = self._job_dir(job_id) / LOG_SNAPSHOT.format(stream=stream)
            if snapshot.is_file():
                _write_atomically(target, snapshot.read_bytes())
            elif service is not None:
                with _failures(f"job {job_id}: reading its {stream}"):
                    data = _service_log(service, stream, _label_int(service, LABEL_LOG_BYTES))
                _write_atomically(target, data)
            elif not target.is_file():
                _write_atomically(target, b"[sandbox: the logs are gone: the service was removed]\n")
            content = target.read_bytes()
            collected.append(
                CollectedFile(path=f"logs/{stream}.txt", size=len(content), sha256=_sha256(content), stored_at=target)
            )
        return collected[0], collected[1]

    def _load_status(self, job_id: str) -> _PersistedStatus:
        path = self._job_dir(job_id) / STATUS_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return _PersistedStatus()
        except (OSError, ValueError) as error:
            raise RunnerError(f"job {job_id}: cannot read {path}: {error}") from error
        known = {name: raw[name] for name in _PersistedStatus.__dataclass_fields__ if name in raw}
        return _PersistedStatus(**known)

    def _save_status(self, job_id: str, persisted: _PersistedStatus) -> None:
        job_dir = self._job_dir(job_id)
        if not job_dir.is_dir():
            return  # cleaned up: nothing left to remember
        with _failures(f"job {job_id}: writing {STATUS_FILE}"):
            _write_atomically(job_dir / STATUS_FILE, json.dumps(asdict(persisted), sort_keys=True).encode())


def _tasks(service: Any) -> list[dict[str, Any]]:
    """The service's tasks, oldest first (a one-shot service has one, unless the swarm replaced it)."""
    tasks: list[dict[str, Any]] = service.tasks()
    return sorted(tasks, key=lambda task: (_timestamp(task.get("CreatedAt")) or 0.0,
                                           int(task.get("Version", {}).get("Index", 0))))


def _latest_task(service: Any) -> dict[str, Any] | None:
    tasks = _tasks(service)
    return tasks[-1] if tasks else None


def _may_have_run(task: dict[str, Any], persisted: _PersistedStatus) -> bool:
    """Whether the job's code may have run in `task`: seen running, exited, or given a container at all."""
    container_id = (task["Status"].get("ContainerStatus") or {}).get("ContainerID")
    return (task.get("ID") == persisted.run_task or task["Status"]["State"] in ("running", "complete", "failed")
            or bool(container_id))


def _force_new_task(manager: Any, service: Any) -> None:
    """A forced update of a one-shot service, which makes the swarm run its task anew.

    Sent as the service's own spec with TaskTemplate.ForceUpdate raised: docker-py's `force_update` adds
    an UpdateConfig, which the swarm refuses for jobs.
    """
    service.reload()
    spec = service.attrs["Spec"]
    template = {**spec["TaskTemplate"], "ForceUpdate": int(spec["TaskTemplate"].get("ForceUpdate", 0)) + 1}
    manager.api.update_service(service.id, service.attrs["Version"]["Index"], task_template=template,
                               name=spec["Name"], labels=spec.get("Labels"), mode=spec["Mode"],
                               fetch_current_spec=False)


def _describe(task: dict[str, Any]) -> str:
    status = task["Status"]
    return f"{status['State']}: {status.get('Err') or status.get('Message') or 'no reason given'}"


def _service_log(service: Any, stream: str, limit: int) -> bytes:
    """The first `limit` bytes of the service's `stream` (and a marker if there was more), read no further."""
    chunks: list[bytes] = []
    size = 0
    reader = service.logs(stdout=stream == "stdout", stderr=stream == "stderr", follow=False)
    try:
        for chunk in reader:
            chunks.append(bytes(chunk))
            size += len(chunk)
            if size > limit:
                break
    finally:
        with contextlib.suppress(Exception):
            reader.close()
    return bounded_log(b"".join(chunks), limit)


def _label_int(service: Any, label: str) -> int:
    value = (service.attrs["Spec"].get("Labels") or {}).get(label, "")
    try:
        return int(value)
    except ValueError:
        raise RunnerError(f"service {service.name} has no valid {label} label ({value!r})") from None


def _remove_network(network: Any, *, wait_s: float) -> bool:
    """Remove `network`, waiting up to `wait_s` while its last task lets go of it; True once it is gone."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            network.remove()
            return True
        except docker.errors.NotFound:
            return True
        except docker.errors.APIError as error:
            if error.status_code not in (403, 409, 500) or time.monotonic() >= deadline:
                return False
        except (docker.errors.DockerException, OSError):
            return False
        time.sleep(0.25)


def _node_label(node: dict[str, Any]) -> str:
    """A node's name: its org.sandbox.node label, else its hostname."""
    return str((node["Spec"].get("Labels") or {}).get(LABEL_NODE) or node["Description"].get("Hostname", node["ID"]))


def _node_gpus(node: dict[str, Any]) -> int:
    return len(_node_gpu_ids(node))


def _node_gpu_ids(node: dict[str, Any]) -> list[str]:
    """The GPUs a node advertises as the generic resource NVIDIA-GPU: their ids (indices for a bare count)."""
    ids: list[str] = []
    for resource in node["Description"]["Resources"].get("GenericResources") or []:
        named, discrete = resource.get("NamedResourceSpec"), resource.get("DiscreteResourceSpec")
        if named and named.get("Kind") == GENERIC_GPU and _GPU_ID.fullmatch(str(named.get("Value", ""))):
            ids.append(str(named["Value"]))
        elif discrete and discrete.get("Kind") == GENERIC_GPU:
            ids += [str(index) for index in range(int(discrete.get("Value", 0)))]
    return ids
