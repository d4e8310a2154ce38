"""The local Docker engine as a job runner: one hardened, network-less container per job.

Nothing lives in memory between calls. A job's state is re-derived on every call from its container
(found by name and labels) and from the files under `state_dir/<job_id>/`:

    output.img    the job's /output file system (sparse ext4 file of Resources.output_mb)
    output/       where it is loop-mounted on the host and bound into the container
    status.json   what Docker cannot tell after the fact: timed out, terminated, peak usage seen

so a service restarted at any point picks up where it was, and every step may safely run twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors
import docker.types

from runners.base import (
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_MANAGED,
    LABEL_ORG,
    Collected,
    CollectedFile,
    JobDefinition,
    Resources,
    RunState,
    RunStatus,
)
from runners.cgroup_usage import Usage, read_cgroup_usage
from runners.errors import JobNotPreparedError, RunnerError
from runners.gpus import DEVICE_ID, GpuDetection, GpuInfo, detect_gpus
from runners.output_copy import copy_output_tree
from runners.output_quota import MIB, ensure_mounted, image_path, is_mounted, mount_path, remove, space_left

__all__ = ["CONTAINER_PREFIX", "DockerRunner", "JobNotPreparedError", "RunnerError", "container_options"]

CONTAINER_PREFIX = "sandbox-job-"
LABEL_TIMEOUT = "org.sandbox.timeout-s"
LABEL_LOG_BYTES = "org.sandbox.log-bytes"
# The GPUs (device ids, comma-separated) a container was given: read back to know which GPUs are taken.
LABEL_GPUS = "org.sandbox.gpus"
# Driver libraries a GPU job gets: CUDA and nvidia-smi, not graphics, video or display.
GPU_DRIVER_CAPABILITIES = "compute,utility"

SANDBOX_USER = (10001, 10001)
OPEN_FILES_LIMIT = 1024
# Docker keeps at most LOG_FILES files of this size per container; json-file stores each line with
# its stream and timestamp, so keep several times the bytes collect() returns.
LOG_FILES = 2
LOG_FILE_MIN_BYTES = MIB
LOG_FILE_FACTOR = 4
# Below this much free space (or with no free inode) the output file system counts as full.
OUTPUT_FULL_BYTES = 64 * 1024

DP_SOCKET_DIR = "/run/sandbox"
DP_SOCKET_TARGET = f"{DP_SOCKET_DIR}/dp.sock"
# The container's own tmpfs, not the host's /tmp.
CONTAINER_TMP = "/tmp"  # noqa: S108
STATUS_FILE = "status.json"

# Used with fullmatch: `$` would let a trailing newline through.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_DATA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
# A file collection's two mounts in its dataset's own folder: the manifest, and the folder of its files.
_DATA_MANIFEST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}/manifest\.parquet")
_DATA_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}/files")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
_NEVER = "0001-01-01T00:00:00Z"
_RUNNING_STATES = frozenset({"running", "paused", "restarting"})
# A container holds its GPUs from creation until it exits (a prepared one will start on them).
_HOLDS_GPUS = _RUNNING_STATES | {"created"}


@dataclass
class _PersistedStatus:
    """What `status.json` holds: facts Docker forgets or never knew."""

    timed_out: bool = False
    terminated: bool = False
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0


def container_name(job_id: str) -> str:
    return CONTAINER_PREFIX + job_id


def log_file_bytes(log_bytes: int) -> int:
    """The max-size of each of Docker's json log files for a job that may keep `log_bytes` per stream."""
    return max(LOG_FILE_MIN_BYTES, LOG_FILE_FACTOR * log_bytes)


def truncation_marker(limit: int) -> bytes:
    return f"\n[sandbox: log truncated, only the first {limit} bytes were kept]\n".encode()


def bounded_log(data: bytes, limit: int) -> bytes:
    """The first `limit` bytes of a log, and a marker line if there was more."""
    return data if len(data) <= limit else data[:limit] + truncation_marker(limit)


def container_options(job: JobDefinition, *, instance_id: str, output_dir: Path,
                      gpu_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """The `containers.create` arguments for `job`: the whole hardening baseline in one place.

    Pure apart from resolving host paths, which must exist. `output_dir` is the mounted quota file system.
    `gpu_ids` are the GPUs the runner gives the job (none for a CPU job) when it hands out this host's
    GPUs itself; None leaves the choice to the engine, which gives a job of N GPUs its first N.
    """
    validate_job(job)
    resources = job.resources
    memory = f"{resources.memory_mb}m"
    output_bytes = resources.output_mb * MIB
    data: tuple[tuple[Literal["file", "folder"], dict[str, Path]], ...] = (
        ("file", job.data_files), ("folder", job.data_folders))
    mounts = [
        docker.types.Mount(
            target="/code", source=str(_host_path(job.code_dir, "code folder", "folder")), type="bind", read_only=True
        ),
        *(
            docker.types.Mount(
                target=f"/data/{name}",
                source=str(_host_path(path, f"data {kind} {name!r}", kind)),
                type="bind",
                read_only=True,
            )
            for kind, paths in data
            for name, path in sorted(paths.items())
        ),
        docker.types.Mount(target="/output", source=str(output_dir), type="bind", read_only=False),
    ]
    if job.dp_socket is not None:
        # The socket's own folder is mounted, not the socket: a worker restarted mid-job binds a new
        # socket there, which a file mount (pinned to the old inode) would never see. Read-only still
        # lets the job connect: Linux checks write access to a socket's inode, not its mount.
        socket = _host_path(job.dp_socket, "DP socket", "socket")
        if socket.name != "dp.sock" or any(entry.name != "dp.sock" for entry in socket.parent.iterdir()):
            raise RunnerError(f"job {job.id}: the DP socket must be the only entry, dp.sock, of its own folder")
        mounts.append(docker.types.Mount(target=DP_SOCKET_DIR, source=str(socket.parent), type="bind", read_only=True))
    gpu_environment: dict[str, str] = {}
    if resources.gpus > 0:
        gpu_environment["NVIDIA_DRIVER_CAPABILITIES"] = GPU_DRIVER_CAPABILITIES
    elif gpu_ids is not None:
        # On a GPU host whose default runtime is NVIDIA's, an image's own `ENV NVIDIA_VISIBLE_DEVICES=all`
        # (every CUDA base image has it) would open every GPU to a job the scheduler gave none.
        gpu_environment["NVIDIA_VISIBLE_DEVICES"] = "void"
    options: dict[str, Any] = {
        "image": job.image,
        "command": list(job.command),
        "name": container_name(job.id),
        "hostname": "sandbox",
        "user": f"{SANDBOX_USER[0]}:{SANDBOX_USER[1]}",
        "working_dir": "/code",
        # Only what the job definition gives: the service's own environment holds secrets.
        "environment": {**job.env, "HOME": CONTAINER_TMP, **gpu_environment},
        "labels": {
            LABEL_MANAGED: "1",
            LABEL_JOB: job.id,
            LABEL_ORG: job.org,
            LABEL_INSTANCE: instance_id,
            LABEL_TIMEOUT: str(resources.timeout_s),
            LABEL_LOG_BYTES: str(resources.log_bytes),
        },
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        # The engine's default seccomp profile applies unless a `seccomp=` option replaces it; none does.
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "devices": [],
        "init": True,
        "ipc_mode": "private",
        "cgroupns": "private",
        "pids_limit": resources.pids,
        "mem_limit": memory,
        "memswap_limit": memory,  # equal: no swap, so a memory bomb meets the OOM killer, not the disk
        "nano_cpus": int(resources.cpus * 1e9),
        # Under host memory pressure the kernel kills a job before the service.
        "oom_score_adj": 500,
        "ulimits": [
            docker.types.Ulimit(name="nofile", soft=OPEN_FILES_LIMIT, hard=OPEN_FILES_LIMIT),
            # No file anywhere (/tmp included) larger than the output quota, sparse ones included.
            docker.types.Ulimit(name="fsize", soft=output_bytes, hard=output_bytes),
            # A core dump would copy the job's memory, data rows and all, to wherever core_pattern points.
            docker.types.Ulimit(name="core", soft=0, hard=0),
        ],
        "tmpfs": {CONTAINER_TMP: f"rw,noexec,nosuid,nodev,size={resources.tmp_mb}m,mode=1777"},
        "mounts": mounts,
        "log_config": docker.types.LogConfig(
            type="json-file",
            config={"max-size": str(log_file_bytes(resources.log_bytes)), "max-file": str(LOG_FILES)},
        ),
        "auto_remove": False,
        "restart_policy": {"Name": "no"},
    }
    if resources.gpus > 0 and gpu_ids is None:
        options["device_requests"] = [docker.types.DeviceRequest(count=resources.gpus, capabilities=[["gpu"]])]
    elif resources.gpus > 0 and gpu_ids is not None:
        if len(gpu_ids) != resources.gpus or not all(DEVICE_ID.fullmatch(device) for device in gpu_ids):
            raise RunnerError(f"job {job.id}: asks for {resources.gpus} GPU(s) but was given {list(gpu_ids)!r}")
        # By id, not count: Docker turns a count of N into "GPUs 0..N-1", so two one-GPU jobs would share GPU 0.
        options["device_requests"] = [docker.types.DeviceRequest(device_ids=list(gpu_ids), capabilities=[["gpu"]])]
        options["labels"][LABEL_GPUS] = ",".join(gpu_ids)
    elif gpu_ids:
        raise RunnerError(f"job {job.id}: asks for no GPU but was given {list(gpu_ids)!r}")
    return options


def copy_job_outputs(job_id: str, job_dir: Path, destination: Path) -> tuple[list[CollectedFile], dict[str, str]]:
    """The regular files of a job's /output file system (`job_dir`'s quota) copied to `destination/files/`,
    and what was refused; any runner whose tasks write to that file system collects this way."""
    image = image_path(job_dir)
    if not image.is_file():
        raise JobNotPreparedError(f"job {job_id}: no output file system to collect from")
    with _failures(f"job {job_id}: collecting outputs into {destination}"):
        output_dir = ensure_mounted(job_dir, size_mb=0, owner=SANDBOX_USER, create=False)
        # The copy may not exceed the quota even if the job left sparse files: the quota is the file's size.
        return copy_output_tree(output_dir, destination / "files", max_total_bytes=image.stat().st_size)


def validate_job(job: JobDefinition) -> None:
    """Refuse a job definition whose ids or names could escape a path, a label or the container."""
    validate_job_id(job.id)
    if not _IMAGE_ID.fullmatch(job.image):
        raise RunnerError(f"job {job.id}: image must be a local image id (sha256:...), not {job.image!r}")
    if not job.command:
        raise RunnerError(f"job {job.id}: the command is empty")
    for name in job.data_files:
        if not (_DATA_NAME.fullmatch(name) or _DATA_MANIFEST.fullmatch(name)):
            raise RunnerError(f"job {job.id}: data file name {name!r} is not a plain file name "
                              "or <dataset>/manifest.parquet")
    for name in job.data_folders:
        if not _DATA_FOLDER.fullmatch(name):
            raise RunnerError(f"job {job.id}: data folder name {name!r} is not <dataset>/files")
    # A plain file named like a collection's folder would be mounted where that folder goes.
    dataset_folders = {name.partition("/")[0] for name in [*job.data_files, *job.data_folders] if "/" in name}
    if dataset_folders & set(job.data_files):
        raise RunnerError(f"job {job.id}: a data file is named like a collection's folder")
    for key, value in job.env.items():
        if not _ENV_NAME.fullmatch(key) or "\0" in value:
            raise RunnerError(f"job {job.id}: environment variable {key!r} is not allowed")
        if key.upper().startswith("NVIDIA_"):
            # The NVIDIA runtime reads these to decide which devices and driver files a container gets.
            raise RunnerError(f"job {job.id}: environment variable {key!r} is not allowed: the platform "
                              "decides which GPUs a job sees")
    _validate_resources(job.id, job.resources)


def validate_job_id(job_id: str) -> None:
    if not _JOB_ID.fullmatch(job_id):
        raise RunnerError(f"job id {job_id!r} is not allowed: letters, digits, '_', '.', '-' only")


class DockerRunner:
    """Runs each job in a hardened container of the local Docker engine; implements `runners.base.JobRunner`."""

    def __init__(
        self,
        *,
        state_dir: Path,
        instance_id: str,
        client: docker.DockerClient | None = None,
        stop_grace_s: int = 2,
        gpus: Sequence[GpuInfo] = (),
    ) -> None:
        if not instance_id:
            raise RunnerError("instance_id must not be empty")
        self.state_dir = Path(os.path.realpath(state_dir))
        self.instance_id = instance_id
        self.stop_grace_s = stop_grace_s
        if client is None:
            with _failures("connecting to the Docker engine"):
                client = docker.from_env()
        self.client: Any = client
        # The GPUs this runner hands out, each to one job at a time; with none, the engine picks (see
        # container_options), which only the scheduler's refusal of GPU jobs keeps from mattering.
        self.gpus: tuple[GpuInfo, ...] = tuple(gpus)
        self._gpu_lock = threading.Lock()

    def use_host_gpus(self) -> GpuDetection:
        """Detect this machine's NVIDIA GPUs (`runners.gpus`) and hand them out to jobs from now on."""
        detection = detect_gpus(self.client)
        self.gpus = detection.gpus
        return detection

    # --- the JobRunner steps ---

    def prepare(self, job: JobDefinition) -> None:
        """Create the output quota and the container (not started); keep whatever a previous call made."""
        validate_job(job)
        job_dir = self._job_dir(job.id)
        with _failures(f"job {job.id}: creating {job_dir}"):
            job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            output_dir = ensure_mounted(job_dir, size_mb=job.resources.output_mb, owner=SANDBOX_USER)
        if self._container(job.id) is not None:
            return
        if not self.gpus:
            self._create(job, container_options(job, instance_id=self.instance_id, output_dir=output_dir))
            return
        # Choosing free GPUs and creating the container that takes them is one step: two jobs prepared
        # at once must not both pick the same free GPU.
        with self._gpu_lock:
            gpu_ids = self._free_gpus(job) if job.resources.gpus > 0 else []
            self._create(job, container_options(job, instance_id=self.instance_id, output_dir=output_dir,
                                                gpu_ids=gpu_ids))

    def _create(self, job: JobDefinition, options: dict[str, Any]) -> None:
        try:
            self.client.containers.create(**options)
        except docker.errors.ImageNotFound as error:
            raise RunnerError(f"job {job.id}: image {job.image} is not in the local Docker engine") from error
        except docker.errors.APIError as error:
            # Another worker created it between our look and our create: fine if it is ours.
            if error.status_code == 409 and self._container(job.id) is not None:
                return
            raise RunnerError(f"job {job.id}: creating the container failed: {_explain(error)}") from error
        except (docker.errors.DockerException, OSError) as error:
            raise RunnerError(f"job {job.id}: creating the container failed: {_explain(error)}") from error

    def start(self, job: JobDefinition) -> None:
        """Start the prepared container; a no-op if it is running or has exited."""
        validate_job_id(job.id)
        container = self._container(job.id)
        if container is None:
            raise JobNotPreparedError(f"job {job.id}: no container to start; call prepare() first")
        if container.status != "created":
            return
        if self._load_status(job.id).terminated:
            raise RunnerError(f"job {job.id} was terminated before it started; it will not be started")
        job_dir = self._job_dir(job.id)
        with _failures(f"job {job.id}: mounting the output file system"):
            # After a host reboot the container survives but the loop mount does not.
            ensure_mounted(job_dir, size_mb=job.resources.output_mb, owner=SANDBOX_USER, create=False)
        with _failures(f"job {job.id}: starting the container"):
            container.start()

    def poll(self, job_id: str) -> RunStatus:
        """The job's state, usage and limits; kills it if its wall-clock time is up."""
        validate_job_id(job_id)
        container = self._container(job_id)
        persisted = self._load_status(job_id)
        output_full = self._output_full(job_id)
        if container is None:
            return RunStatus(
                state=RunState.UNKNOWN,
                timed_out=persisted.timed_out,
                output_full=output_full,
                cpu_seconds=persisted.cpu_seconds,
                peak_memory_bytes=persisted.peak_memory_bytes,
            )
        state = container.attrs["State"]
        if state["Status"] in _RUNNING_STATES:
            self._sample_usage(job_id, container, persisted)
            started_at = _timestamp(state.get("StartedAt"))
            timeout_s = _label_int(container, LABEL_TIMEOUT)
            over_time = started_at is not None and time.time() >= started_at + timeout_s
            if over_time and not persisted.timed_out and not persisted.terminated:
                # Written before the kill: a crash in between must not forget why the job died.
                persisted.timed_out = True
                self._save_status(job_id, persisted)
            if persisted.timed_out or persisted.terminated:
                self._kill(job_id, container)
                with _failures(f"job {job_id}: inspecting the killed container"):
                    container.reload()
                state = container.attrs["State"]
        return self._status_from(state, persisted, output_full)

    def collect(self, job_id: str, destination: Path) -> Collected:
        """Copy /output's regular files to `destination/files/` and the logs to `destination/logs/`."""
        validate_job_id(job_id)
        container = self._container(job_id)
        if container is not None and container.attrs["State"]["Status"] in _RUNNING_STATES:
            raise RunnerError(f"job {job_id} is still running; collect after it exits")
        destination = Path(os.path.abspath(destination))
        files, refused = copy_job_outputs(job_id, self._job_dir(job_id), destination)
        with _failures(f"job {job_id}: collecting its logs into {destination}"):
            stdout, stderr = self._collect_logs(job_id, container, destination / "logs")
        return Collected(files=files, refused=refused, stdout=stdout, stderr=stderr)

    def terminate(self, job_id: str) -> None:
        """Stop the job now (SIGTERM, SIGKILL after a short grace) and make sure it never starts again."""
        validate_job_id(job_id)
        container = self._container(job_id)
        if self._job_dir(job_id).is_dir():
            persisted = self._load_status(job_id)
            if not persisted.terminated:
                persisted.terminated = True
                self._save_status(job_id, persisted)
        if container is None or container.status not in _RUNNING_STATES:
            return
        with _failures(f"job {job_id}: stopping the container"):
            # Killing the container's init ends its whole pid namespace, background processes included.
            container.stop(timeout=self.stop_grace_s)

    def cleanup(self, job_id: str) -> None:
        """Remove the container, unmount and delete the output file system and the job's state folder."""
        validate_job_id(job_id)
        container = self._container(job_id)
        if container is not None:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except (docker.errors.DockerException, OSError) as error:
                raise RunnerError(f"job {job_id}: removing the container failed: {_explain(error)}") from error
        job_dir = self._job_dir(job_id)
        if not job_dir.exists():
            return
        with _failures(f"job {job_id}: removing {job_dir}"):
            remove(job_dir)
            if is_mounted(mount_path(job_dir)):
                raise RunnerError(f"job {job_id}: {mount_path(job_dir)} is still mounted; not deleting it")
            for child in job_dir.iterdir():
                child.unlink()
            job_dir.rmdir()

    def managed_jobs(self) -> set[str]:
        """Jobs with a container labelled for this instance (exited ones too) or a state folder."""
        filters = {"label": [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={self.instance_id}"]}
        # The low-level list carries labels already; the high-level one inspects every container.
        with _failures("listing this instance's containers"):
            containers = self.client.api.containers(all=True, filters=filters)
        jobs = {str(c["Labels"][LABEL_JOB]) for c in containers if LABEL_JOB in (c.get("Labels") or {})}
        with _failures(f"listing {self.state_dir}"):
            folders = list(self.state_dir.iterdir()) if self.state_dir.is_dir() else []
        jobs |= {folder.name for folder in folders if folder.is_dir() and _JOB_ID.fullmatch(folder.name)}
        return jobs

    # --- helpers ---

    def _job_dir(self, job_id: str) -> Path:
        return self.state_dir / job_id

    def _free_gpus(self, job: JobDefinition) -> list[str]:
        """Device ids of `job.resources.gpus` of this runner's GPUs that no live sandbox container holds.

        Read from the engine (every instance's containers: the GPUs are the machine's), never from memory,
        so a restarted worker knows which GPUs its running jobs have.
        """
        filters = {"label": [f"{LABEL_MANAGED}=1", LABEL_GPUS]}
        with _failures(f"job {job.id}: listing the containers that hold GPUs"):
            containers = self.client.api.containers(all=True, filters=filters)
        held = {device for c in containers if c.get("State") in _HOLDS_GPUS
                for device in str((c.get("Labels") or {}).get(LABEL_GPUS, "")).split(",") if device}
        free = [gpu.device_id for gpu in self.gpus if gpu.device_id not in held]
        if len(free) < job.resources.gpus:
            raise RunnerError(f"job {job.id}: needs {job.resources.gpus} GPU(s) but only {len(free)} of this "
                              f"machine's {len(self.gpus)} are free")
        return free[: job.resources.gpus]

    def _container(self, job_id: str) -> Any:
        return owned_container(self.client, container_name(job_id), instance_id=self.instance_id, what=f"job {job_id}")

    def _kill(self, job_id: str, container: Any) -> None:
        kill_container(container, f"job {job_id}: killing the container")

    def _sample_usage(self, job_id: str, container: Any, persisted: _PersistedStatus) -> None:
        usage = read_cgroup_usage(int(container.attrs["State"].get("Pid") or 0), str(container.id))
        if usage is None:
            usage = _stats_usage(container)
        if usage is None:
            return
        cpu_seconds = max(persisted.cpu_seconds, usage.cpu_seconds)
        peak = max(persisted.peak_memory_bytes, usage.peak_memory_bytes)
        if (cpu_seconds, peak) != (persisted.cpu_seconds, persisted.peak_memory_bytes):
            persisted.cpu_seconds, persisted.peak_memory_bytes = cpu_seconds, peak
            self._save_status(job_id, persisted)

    def _status_from(self, state: dict[str, Any], persisted: _PersistedStatus, output_full: bool) -> RunStatus:
        run_state = run_state_of(state["Status"])
        exited = run_state is RunState.EXITED
        return RunStatus(
            state=run_state,
            exit_code=int(state["ExitCode"]) if exited else None,
            oom_killed=bool(state.get("OOMKilled")),
            timed_out=persisted.timed_out,
            output_full=output_full,
            started_at=_timestamp(state.get("StartedAt")),
            finished_at=_timestamp(state.get("FinishedAt")) if exited else None,
            cpu_seconds=persisted.cpu_seconds,
            peak_memory_bytes=persisted.peak_memory_bytes,
        )

    def _output_full(self, job_id: str) -> bool:
        mountpoint = mount_path(self._job_dir(job_id))
        if not is_mounted(mountpoint):
            return False
        free_bytes, free_inodes = space_left(mountpoint)
        return free_bytes < OUTPUT_FULL_BYTES or free_inodes == 0

    def _collect_logs(self, job_id: str, container: Any, folder: Path) -> tuple[CollectedFile, CollectedFile]:
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        collected: list[CollectedFile] = []
        for stream in ("stdout", "stderr"):
            target = folder / f"{stream}.txt"
            if container is not None:
                limit = _label_int(container, LABEL_LOG_BYTES)
                with _failures(f"job {job_id}: reading its {stream}"):
                    # Bounded in memory too: the log driver keeps at most LOG_FILES * log_file_bytes(limit).
                    data = container.logs(stdout=stream == "stdout", stderr=stream == "stderr")
                _write_atomically(target, bounded_log(bytes(data), limit))
            elif not target.is_file():
                # The container is gone (cleaned up, or removed by hand) and the logs with it.
                _write_atomically(target, b"[sandbox: the logs are gone: the container was removed]\n")
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
        return _PersistedStatus(
            timed_out=bool(raw.get("timed_out", False)),
            terminated=bool(raw.get("terminated", False)),
            cpu_seconds=float(raw.get("cpu_seconds", 0.0)),
            peak_memory_bytes=int(raw.get("peak_memory_bytes", 0)),
        )

    def _save_status(self, job_id: str, persisted: _PersistedStatus) -> None:
        job_dir = self._job_dir(job_id)
        if not job_dir.is_dir():
            return  # cleaned up: nothing left to remember
        with _failures(f"job {job_id}: writing {STATUS_FILE}"):
            _write_atomically(job_dir / STATUS_FILE, json.dumps(asdict(persisted), sort_keys=True).encode())


def _validate_resources(job_id: str, resources: Resources) -> None:
    positive = {
        "cpus": resources.cpus,
        "memory_mb": resources.memory_mb,
        "timeout_s": resources.timeout_s,
        "pids": resources.pids,
        "output_mb": resources.output_mb,
        "tmp_mb": resources.tmp_mb,
        "log_bytes": resources.log_bytes,
    }
    for name, value in positive.items():
        if not value > 0:
            raise RunnerError(f"job {job_id}: resources.{name} must be positive, not {value!r}")
    if resources.gpus < 0:
        raise RunnerError(f"job {job_id}: resources.gpus must not be negative")


def _host_path(path: Path, what: str, kind: Literal["file", "folder", "socket"]) -> Path:
    """The real path of a host file to bind in; it must exist and be of `kind` (Docker would make a folder)."""
    resolved = Path(os.path.realpath(path))
    try:
        mode = resolved.stat().st_mode
    except OSError as error:
        raise RunnerError(f"the {what} {path} cannot be used: {error.strerror}") from error
    expected = {"file": stat.S_ISREG, "folder": stat.S_ISDIR, "socket": stat.S_ISSOCK}[kind]
    if not expected(mode):
        raise RunnerError(f"the {what} {path} is not a {kind}")
    return resolved


def _stats_usage(container: Any) -> Usage | None:
    """Usage from the engine's stats endpoint, when the cgroup files are not readable from here."""
    try:
        stats = container.stats(stream=False, one_shot=True)
    except (docker.errors.DockerException, OSError):
        return None
    try:
        cpu_ns = int(stats["cpu_stats"]["cpu_usage"]["total_usage"])
        memory = stats["memory_stats"]
        peak = int(memory.get("max_usage") or memory.get("usage") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    return Usage(cpu_seconds=cpu_ns / 1e9, peak_memory_bytes=peak)


def _label_int(container: Any, label: str) -> int:
    value = (container.labels or {}).get(label, "")
    try:
        return int(value)
    except ValueError:
        raise RunnerError(f"container {container.name} has no valid {label} label ({value!r})") from None


def _timestamp(value: str | None) -> float | None:
    """Seconds since the epoch from Docker's RFC 3339 time (nanoseconds, 'Z'); None for its zero time."""
    if not value or value == _NEVER:
        return None
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", value)
    if match is None:
        raise RunnerError(f"cannot read Docker's timestamp {value!r}")
    whole, fraction, zone = match.groups()
    moment = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    if moment.year <= 1:
        return None
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _explain(error: BaseException) -> str:
    if isinstance(error, docker.errors.APIError):
        return str(error.explanation or error)
    return str(error) or type(error).__name__


@contextlib.contextmanager
def _failures(what: str) -> Iterator[None]:
    """Turn any Docker or OS failure inside the block into a RunnerError saying what was being done."""
    try:
        yield
    except RunnerError:
        raise
    except (docker.errors.DockerException, OSError) as error:
        raise RunnerError(f"{what} failed: {_explain(error)}") from error


def kill_container(container: Any, what: str) -> None:
    """SIGKILL `container` and wait for it to exit; one already gone or stopped is fine. `what` names the step."""
    try:
        container.kill()
        container.wait(timeout=30)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as error:
        if error.status_code != 409:  # 409: it is not running any more
            raise RunnerError(f"{what} failed: {_explain(error)}") from error
    except (docker.errors.DockerException, OSError) as error:
        raise RunnerError(f"{what} failed: {_explain(error)}") from error


def owned_container(client: Any, name: str, *, instance_id: str, what: str) -> Any:
    """The container `name` if it exists and belongs to this instance; None if there is none.

    A container of that name that another instance (or nobody) labelled is an error, never adopted.
    """
    try:
        container = client.containers.get(name)
    except docker.errors.NotFound:
        return None
    except (docker.errors.DockerException, OSError) as error:
        raise RunnerError(f"{what}: inspecting container {name} failed: {_explain(error)}") from error
    labels: dict[str, str] = container.labels or {}
    if labels.get(LABEL_MANAGED) != "1" or labels.get(LABEL_INSTANCE) != instance_id:
        raise RunnerError(f"{what}: a container named {name} exists but this instance does not own it")
    return container


def run_state_of(status: str) -> RunState:
    """A container's engine status as the runner's state."""
    if status == "created":
        return RunState.PREPARED
    if status in _RUNNING_STATES:
        return RunState.RUNNING
    return RunState.EXITED  # exited, dead, removing
