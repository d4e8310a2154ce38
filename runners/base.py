"""The runner contract: what the scheduler asks of an execution backend, step by idempotent step.

The scheduler never imports Docker. It hands a `JobDefinition` to a `JobRunner` and re-derives
each job's state from `poll()` on every tick, so a service restarted mid-job loses nothing:
every step may be called again after a crash and must then do nothing harmful.

Notebook kernels run in the same sandbox as jobs, through a `KernelRunner`: the notebook server that
owns a kernel starts, watches and removes it, and the worker removes the kernels no live server owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

# The job images this platform builds (`runners/images.py`); a worker publishes each by name once its
# engine has it. Named here, without the Docker SDK, so the API can tell "not built yet" from "no such image".
JOB_IMAGES: tuple[str, ...] = ("analysis", "training")

# Labels on everything a runner creates, so reconciliation can find (and remove) what it owns.
LABEL_MANAGED = "org.sandbox.managed"
LABEL_JOB = "org.sandbox.job"
LABEL_ORG = "org.sandbox.org"
LABEL_INSTANCE = "org.sandbox.instance"
# Kernels carry these instead of LABEL_JOB, so the job reconciliation leaves them alone.
LABEL_KERNEL = "org.sandbox.kernel"
LABEL_NOTEBOOK = "org.sandbox.notebook"
LABEL_CONTRACT = "org.sandbox.contract"


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    memory_mb: int = 1024
    timeout_s: int = 600
    gpus: int = 0
    pids: int = 256
    output_mb: int = 100
    tmp_mb: int = 256
    log_bytes: int = 1_000_000


@dataclass(frozen=True)
class JobDefinition:
    """Everything needed to run one job; built by the scheduler from the stored job."""

    id: str
    org: str
    image: str  # an image id (sha256:...), never a mutable tag
    command: list[str]
    code_dir: Path  # host folder mounted read-only at /code
    # name in /data -> host file, read-only: "<dataset>.parquet" for a table, "<dataset>/manifest.parquet" for
    # a file collection's manifest
    data_files: dict[str, Path] = field(default_factory=dict)
    # name in /data -> host folder, read-only: "<dataset>/files", a file collection's folder, read in place
    data_folders: dict[str, Path] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    dp_socket: Path | None = None  # host socket `<folder>/dp.sock`; the folder is mounted at /run/sandbox
    env: dict[str, str] = field(default_factory=dict)
    # "<dataset>.v<N>": the dataset version /data comes from, for runners that place jobs near their data.
    data_version: str | None = None


class RunState(StrEnum):
    UNKNOWN = "unknown"  # the runner has nothing for this job (never started, or vanished)
    PREPARED = "prepared"  # created but not started
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True)
class RunStatus:
    state: RunState
    exit_code: int | None = None
    oom_killed: bool = False
    timed_out: bool = False
    output_full: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0
    # Why the run was lost to the platform (its node went down, the orchestrator ended its task): the job
    # did not fail by itself, and nothing of it can be collected. None on one machine.
    lost: str | None = None
    # cpu_seconds is wall time x the CPUs reserved, not a measurement (no engine of the job's node to ask).
    usage_estimated: bool = False


@dataclass(frozen=True)
class CollectedFile:
    path: str  # relative to /output, POSIX separators
    size: int
    sha256: str
    stored_at: Path  # where the runner copied it on the host


@dataclass(frozen=True)
class Collected:
    files: list[CollectedFile]
    refused: dict[str, str]  # path -> why it was not copied (symlink, device, fifo, too large...)
    stdout: CollectedFile
    stderr: CollectedFile


class JobRunner(Protocol):
    def prepare(self, job: JobDefinition) -> None:
        """Create whatever the job needs (output quota, container); idempotent."""

    def start(self, job: JobDefinition) -> None:
        """Start the prepared job; a no-op if it is running or has exited."""

    def poll(self, job_id: str) -> RunStatus:
        """The job's current state; enforces the wall-clock timeout as a side effect."""

    def collect(self, job_id: str, destination: Path) -> Collected:
        """Copy /output files and the logs to `destination` (after exit); idempotent."""

    def terminate(self, job_id: str) -> None:
        """Stop the job now if it is running; a no-op otherwise."""

    def cleanup(self, job_id: str) -> None:
        """Remove the container and any scratch state; a no-op if already gone."""

    def managed_jobs(self) -> set[str]:
        """Ids of every job this runner has anything for (to find orphans)."""


@dataclass(frozen=True)
class KernelDefinition:
    """One notebook kernel: a job's sandbox (`job`: image, command, /code, /data, limits, DP socket) whose
    /output, and working folder, is the session's workspace, plus the host folder of its IPC sockets."""

    key: str  # the kernel's own id within the instance: letters, digits, '_', '.', '-'
    notebook: str  # the session (a job of kind notebook) whose server owns the kernel
    contract: str
    job: JobDefinition
    workspace: Path  # host folder (the session's quota file system) bound at /output
    ipc_dir: Path  # host folder bound read-write at the runner's IPC folder: connection file and sockets


@dataclass(frozen=True)
class KernelStatus:
    key: str
    notebook: str
    contract: str
    state: RunState
    exit_code: int | None = None
    timed_out: bool = False
    started_at: float | None = None
    cpu_seconds: float = 0.0  # as the kernel's cgroup reports it now (0 once it has exited)


class KernelRunner(Protocol):
    def start_kernel(self, kernel: KernelDefinition) -> None:
        """Create and start the kernel's container; a no-op if it exists already."""

    def kernel_status(self, key: str) -> KernelStatus:
        """The kernel's state and CPU time so far (UNKNOWN once it is gone); kills it past its time limit."""

    def signal_kernel(self, key: str, signum: int) -> None:
        """Send `signum` to the kernel's process if it runs; a no-op otherwise."""

    def remove_kernel(self, key: str) -> KernelStatus:
        """Remove the kernel's container, running or not; its last status (UNKNOWN if it was gone already)."""

    def kernels(self, *, notebook: str | None = None, contract: str | None = None) -> list[KernelStatus]:
        """This instance's kernels, exited ones too; of one session or one contract if given."""
