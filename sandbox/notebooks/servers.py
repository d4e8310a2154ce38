"""The worker's notebook servers: one jupyter_server child process per running session, on a Unix socket.

Store-driven and restart-safe, like jobs: on every tick the worker asks `plan()` which servers to start
(a running session with no live server here) and which to stop (a server whose session ended, and, at
start and every so often, whatever an ended session left on this machine), and at the same times it
removes the kernel containers that no live server of this worker owns (`remove_orphan_kernels`).
Nothing is remembered that the store and the disk cannot tell again, so a worker killed and restarted
brings every running session's server back; its old servers end themselves when their parent dies
(`jupyter/server.py`), and kernels they leave are orphans.

Each server announces itself in its session's server folder (`sandbox.notebooks.endpoint`) once it
answers; the API process reads that file and talks to the server over its socket.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog
from sqlalchemy import select

from runners.base import KernelRunner
from runners.docker import SANDBOX_USER
from runners.errors import RunnerError
from runners.output_quota import ensure_mounted, mount_path, remove
from sandbox.config import Settings
from sandbox.contracts import JobKind
from sandbox.instance import Instance
from sandbox.jobs.lifecycle import JobState
from sandbox.jobs.mounts import collection_problems, job_data, not_mounted
from sandbox.notebooks.endpoint import (
    SOCKET_FILE,
    ServerEndpoint,
    ServerFailure,
    base_url,
    forget_server,
    read_server,
    server_dir,
    servers_root,
    write_failure,
    write_running,
)
from sandbox.notebooks.spec import SPEC_ENV, SessionSpec, notebook_settings
from sandbox.policies import get_policy_version
from sandbox.store.models import Job

log = structlog.get_logger(__name__)

SERVER_MODULE = "sandbox.notebooks.jupyter.server"
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 20.0
# A server that failed to start is tried again after this long, not on every tick.
RETRY_AFTER_S = 10.0


def session_dir(settings: Settings, job_id: str) -> Path:
    """The session's folder in the worker's home: the workspace's quota file system, the spec, the log."""
    return settings.home_dir / "notebooks" / job_id


def workspace_dir(settings: Settings, job_id: str) -> Path:
    """The session's workspace (mounted there while the session runs): the kernels' /output."""
    return mount_path(session_dir(settings, job_id))


@dataclass
class RunningServer:
    job: str
    process: subprocess.Popen[bytes]
    spec: SessionSpec

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass(frozen=True)
class Plan:
    start: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)


class NotebookServers:
    """The notebook servers this worker runs; every method but `plan` blocks (run it off the tick)."""

    def __init__(self, instance: Instance, kernels: KernelRunner) -> None:
        self.instance = instance
        self.kernels = kernels
        self._servers: dict[str, RunningServer] = {}
        self._failed_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = False  # set by stop_all: a start still in flight must not leave a server behind

    # -- what to do ------------------------------------------------------------------------------

    def running_sessions(self) -> set[str]:
        with self.instance.read_session() as session:
            return set(session.execute(select(Job.id).where(
                Job.kind == JobKind.NOTEBOOK.value, Job.state == JobState.RUNNING.value)).scalars())

    def get(self, job_id: str) -> RunningServer | None:
        """The session's live server in this worker, if it has one."""
        with self._lock:
            running = self._servers.get(job_id)
        return running if running is not None and running.alive else None

    def plan(self, *, busy: set[str], leftovers: bool = False) -> Plan:
        """Servers to start (running sessions without a live one) and to stop (sessions that ended); with
        `leftovers`, also what ended sessions left on this machine (a worker that died while stopping one)."""
        sessions = self.running_sessions()
        now = time.monotonic()
        with self._lock:
            live = {job for job, server in self._servers.items() if server.alive}
            ended = set(self._servers) - sessions
            failed = dict(self._failed_at)
        if leftovers:
            ended |= self._leftovers() - sessions - live
        start = sorted(job for job in sessions - live - busy if now - failed.get(job, -RETRY_AFTER_S) >= RETRY_AFTER_S)
        return Plan(start=start, stop=sorted(ended - busy))

    # -- starting --------------------------------------------------------------------------------

    def start(self, job_id: str) -> None:
        """Start the session's server (ending any earlier one and its kernels) and announce it once it answers.

        A failure is announced instead (the API says why) and tried again after RETRY_AFTER_S.
        """
        try:
            self._start(job_id)
        except Exception as error:
            with self._lock:
                self._failed_at[job_id] = time.monotonic()
            folder = server_dir(self.instance.settings, self.instance.instance_id, job_id)
            write_failure(folder, ServerFailure(detail=str(error)))
            raise

    def _notice_not_mounted(self, job_id: str, problems: list[str]) -> None:
        notice = not_mounted(problems)
        with self.instance.system_context() as ctx:
            job = ctx.session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING.value or job.reason == notice:
                return
            job.reason = notice
            ctx.record("notebook.collection_not_mounted", "job", job_id, problems=problems[:50],
                       count=len(problems))

    def _start(self, job_id: str) -> None:
        settings = self.instance.settings
        with self.instance.read_session() as session:
            job = session.get(Job, job_id)
            if job is None or job.kind != JobKind.NOTEBOOK.value or job.state != JobState.RUNNING.value:
                return
            policy_name, _, policy_version = job.policy.partition("@")
            policy = get_policy_version(session, policy_name, int(policy_version)).body
            data_files, data_folders = job_data(self.instance, job, session)
            problems = collection_problems(self.instance, job, session)
            spec_fields: dict[str, Any] = {
                "job": job.id, "org": job.buyer_org, "contract": job.contract_id, "dataset": job.dataset,
                "version": job.dataset_version, "tier": job.tier, "policy": job.policy, "image_id": job.image_id,
            }
        folder = server_dir(settings, self.instance.instance_id, job_id)
        # A server that died (killed, crashed), or one a previous worker left: its kernels are orphans, since
        # nothing relays their messages any more.
        self._end_previous(job_id, folder)
        self._remove_kernels(job_id)
        nb = notebook_settings(policy)
        directory = session_dir(settings, job_id)
        code_dir = directory / "code"
        code_dir.mkdir(parents=True, exist_ok=True)
        workspace = ensure_mounted(directory, size_mb=int(nb["workspace_mb"]), owner=SANDBOX_USER)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket = folder / SOCKET_FILE
        socket.unlink(missing_ok=True)
        if problems:
            # A collection's folder changed since registration: its files are not mounted (the manifest is). The
            # session says why (`notice`, as a job's refusal would), and the audit log keeps the problems.
            log.warning("notebook.collection_not_mounted", job=job_id, problems=problems[:20])
            data_folders = {}
            self._notice_not_mounted(job_id, problems)
        spec = SessionSpec(
            **spec_fields, base_url=base_url(job_id), socket=str(socket), internal_token=secrets.token_urlsafe(32),
            workspace=str(workspace), code_dir=str(code_dir),
            data_files={name: str(path) for name, path in data_files.items()},
            data_folders={name: str(path) for name, path in data_folders.items()}, kernel_root=str(folder),
            settings=settings.model_dump(mode="json"), cull_interval_s=settings.notebook_cull_interval_s,
        )
        spec_path = directory / "session.json"
        spec.write(spec_path)
        environment = {**os.environ, SPEC_ENV: str(spec_path), "JUPYTER_PLATFORM_DIRS": "1",
                       "JUPYTER_RUNTIME_DIR": str(folder / "runtime"), "JUPYTER_DATA_DIR": str(directory / "data"),
                       "JUPYTER_CONFIG_DIR": str(directory / "config"), "JUPYTER_NO_CONFIG": "1"}
        log_file = open(directory / "server.log", "ab")  # noqa: SIM115 - handed to the child process
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE], env=environment, stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log_file.close()
        running = RunningServer(job=job_id, process=process, spec=spec)
        with self._lock:
            closed = self._closed
            if not closed:
                self._servers[job_id] = running
        if closed:
            self._terminate(running)
            return
        try:
            self._wait_ready(running)
        except Exception:
            self._terminate(running)
            raise
        write_running(folder, ServerEndpoint(socket=str(socket), base_url=spec.base_url,
                                             internal_token=spec.internal_token, pid=process.pid))
        with self._lock:
            self._failed_at.pop(job_id, None)
        log.info("notebook_server_started", job=job_id, pid=process.pid)

    def _wait_ready(self, running: RunningServer) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        spec = running.spec
        transport = httpx.HTTPTransport(uds=spec.socket)
        with httpx.Client(transport=transport, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not running.alive:
                    raise RuntimeError(f"the notebook server for {spec.job} exited while starting; "
                                       "the worker's log for the session says why")
                if Path(spec.socket).exists():
                    try:
                        answer = client.get(f"http://localhost{spec.base_url}api/status",
                                            headers={"Authorization": f"token {spec.internal_token}"})
                        if answer.status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                time.sleep(0.05)
        raise RuntimeError(f"the notebook server for {spec.job} did not answer within {START_TIMEOUT_S:.0f} s")

    # -- stopping --------------------------------------------------------------------------------

    def stop(self, job_id: str) -> None:
        """Stop the server (its kernels shut down with it), remove what is left, and drop the workspace.

        The server folder goes last: the API takes its absence to mean the session is torn down.
        """
        with self._lock:
            running = self._servers.pop(job_id, None)
            self._failed_at.pop(job_id, None)
        if running is not None:
            self._terminate(running)
        folder = server_dir(self.instance.settings, self.instance.instance_id, job_id)
        self._end_previous(job_id, folder)
        self._remove_kernels(job_id)
        directory = session_dir(self.instance.settings, job_id)
        if directory.exists():
            remove(directory)  # raises while the workspace is still mounted: nothing below deletes through it
            shutil.rmtree(directory)
        shutil.rmtree(folder, ignore_errors=True)
        log.info("notebook_server_stopped", job=job_id)

    def stop_all(self) -> None:
        """End every server of this worker (as the worker stops); the sessions stay running in the store."""
        with self._lock:
            self._closed = True
            servers = list(self._servers.values())
            self._servers.clear()
        for running in servers:
            if running.alive:
                os.killpg(running.process.pid, signal.SIGTERM)
        for running in servers:
            self._terminate(running)
            forget_server(server_dir(self.instance.settings, self.instance.instance_id, running.job))

    def remove_orphan_kernels(self, busy: Callable[[], set[str]]) -> int:
        """Remove the kernels that no live server of this worker owns; how many. `busy` tells the sessions
        whose server is being started or stopped right now: those steps remove their kernels themselves."""
        try:
            kernels = self.kernels.kernels()
        except RunnerError as error:
            log.warning("notebook_kernels_not_listed", error=str(error))
            return 0
        # Listed before the owners are read: a kernel started since belongs to a server already counted live.
        with self._lock:
            owned = {job for job, server in self._servers.items() if server.alive}
        owned |= busy()
        removed = 0
        for kernel in kernels:
            if kernel.notebook in owned:
                continue
            try:
                self.kernels.remove_kernel(kernel.key)
            except RunnerError as error:
                log.warning("notebook_kernel_not_removed", kernel=kernel.key, error=str(error))
                continue
            removed += 1
            log.info("notebook_kernel_orphan_removed", kernel=kernel.key, job=kernel.notebook)
        return removed

    def _leftovers(self) -> set[str]:
        """Sessions with a server folder or a session folder on this machine."""
        settings = self.instance.settings
        found: set[str] = set()
        for root in (servers_root(settings, self.instance.instance_id), settings.home_dir / "notebooks"):
            if root.is_dir():
                found |= {entry.name for entry in root.iterdir() if entry.is_dir() and not entry.is_symlink()}
        return found

    # -- helpers ---------------------------------------------------------------------------------

    def _terminate(self, running: RunningServer) -> None:
        """SIGTERM (the server shuts its kernels down, recording their usage), SIGKILL after a grace."""
        if running.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGTERM)
        try:
            running.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait(timeout=10)

    def _end_previous(self, job_id: str, folder: Path) -> None:
        """End the session's earlier server: ours if it died or lingers, or one a previous worker started."""
        with self._lock:
            ours = self._servers.pop(job_id, None)
        if ours is not None:
            self._terminate(ours)
        announced = read_server(folder)
        forget_server(folder)
        pid = announced.pid if isinstance(announced, ServerEndpoint) else 0
        if pid and (ours is None or pid != ours.process.pid) and _is_server_of(pid, job_id):
            _end_process_group(pid)

    def _remove_kernels(self, job_id: str) -> None:
        try:
            for kernel in self.kernels.kernels(notebook=job_id):
                self.kernels.remove_kernel(kernel.key)
        except RunnerError as error:
            log.warning("notebook_kernels_not_removed", job=job_id, error=str(error))


def _is_server_of(pid: int, job_id: str) -> bool:
    """Whether `pid` is a notebook server process for this session (not a pid reused by something else)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    spec = next((entry.split(b"=", 1)[1] for entry in environment if entry.startswith(f"{SPEC_ENV}=".encode())), b"")
    return SERVER_MODULE.encode() in command and Path(spec.decode(errors="replace")).parent.name == job_id


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return status.rpartition(")")[2].split()[0] in ("Z", "X")  # a zombie has ended; only its parent can reap it


def _end_process_group(pid: int) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (STOP_GRACE_S if signum == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline:
            if _gone(pid):
                return
            time.sleep(0.1)
