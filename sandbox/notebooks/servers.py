"""The service's notebook servers: one jupyter_server process per running session, on a Unix socket.

Started on first use (a restarted service starts them again for sessions still running), stopped with
the session or the service. Kernel containers outlive nothing: on start-up, those no server owns any
more are removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog

from runners.docker import SANDBOX_USER
from runners.output_quota import ensure_mounted, remove
from sandbox.catalog.service import get_version
from sandbox.dp.mock_publication import mock_path
from sandbox.errors import Conflict, SandboxError
from sandbox.instance import Instance
from sandbox.notebooks.spec import SPEC_ENV, SessionSpec, notebook_settings
from sandbox.policies import get_policy_version
from sandbox.store.models import Job

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 30.0


class NotebookUnavailable(SandboxError):
    status = 503
    title = "Notebook server unavailable"
    slug = "notebook-unavailable"


@dataclass
class RunningServer:
    spec: SessionSpec
    process: subprocess.Popen[bytes]

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class NotebookServers:
    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self._servers: dict[str, RunningServer] = {}
        self._lock = threading.Lock()
        self._starting: dict[str, threading.Lock] = {}

    # -- paths -----------------------------------------------------------------------------------

    def session_dir(self, job_id: str) -> Path:
        return self.instance.settings.home_dir / "notebooks" / job_id

    def runtime_dir(self, job_id: str) -> Path:
        # Unix socket paths are limited to 108 bytes: these live under the short runtime root.
        return self.instance.settings.dp_socket_root / self.instance.instance_id / "nb" / job_id

    def workspace(self, job_id: str) -> Path:
        return self.session_dir(job_id) / "output"

    # -- lifecycle -------------------------------------------------------------------------------

    def ensure(self, job_id: str) -> RunningServer:
        """The session's server, started if it is not running (the caller checked the session is running)."""
        with self._lock:
            running = self._servers.get(job_id)
            if running is not None and running.alive:
                return running
            starting = self._starting.setdefault(job_id, threading.Lock())
        with starting:
            with self._lock:
                running = self._servers.get(job_id)
                if running is not None and running.alive:
                    return running
            running = self._start(job_id)
            with self._lock:
                self._servers[job_id] = running
            return running

    def _start(self, job_id: str) -> RunningServer:
        settings = self.instance.settings
        # Kernels of a server that died (killed, crashed) are orphans: nothing relays their messages any more.
        self._remove_kernels(notebook=job_id)
        with self.instance.read_session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise Conflict(f"no notebook session {job_id}")
            policy_name, _, policy_version = job.policy.partition("@")
            policy = get_policy_version(session, policy_name, int(policy_version)).body
            path = get_version(session, job.dataset, job.dataset_version).path
            spec_fields: dict[str, Any] = {
                "job": job.id, "org": job.buyer_org, "contract": job.contract_id, "dataset": job.dataset,
                "version": job.dataset_version, "tier": job.tier, "policy": job.policy, "image_id": job.image_id,
            }
        nb = notebook_settings(policy)
        directory = self.session_dir(job_id)
        code_dir = directory / "code"
        code_dir.mkdir(parents=True, exist_ok=True)
        workspace = ensure_mounted(directory, size_mb=int(nb["workspace_mb"]), owner=SANDBOX_USER)
        run_dir = self.runtime_dir(job_id)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket = run_dir / "jupyter.sock"
        socket.unlink(missing_ok=True)
        data = settings.artifacts_dir / path
        if spec_fields["tier"] == "dp_only":
            data = mock_path(settings.artifacts_dir, spec_fields["dataset"], spec_fields["version"])
        spec = SessionSpec(
            **spec_fields, base_url=f"/notebooks/{job_id}/", socket=str(socket),
            internal_token=secrets.token_urlsafe(32), workspace=str(workspace), code_dir=str(code_dir),
            data_file=str(data), kernel_root=str(run_dir), settings=settings.model_dump(mode="json"),
            cull_interval_s=settings.notebook_cull_interval_s,
        )
        spec_path = directory / "session.json"
        spec.write(spec_path)
        environment = {**os.environ, SPEC_ENV: str(spec_path), "JUPYTER_PLATFORM_DIRS": "1",
                       "JUPYTER_RUNTIME_DIR": str(run_dir / "runtime"), "JUPYTER_DATA_DIR": str(directory / "data"),
                       "JUPYTER_CONFIG_DIR": str(directory / "config"), "JUPYTER_NO_CONFIG": "1"}
        log_file = open(directory / "server.log", "ab")  # noqa: SIM115 - handed to the child process
        process = subprocess.Popen(
            [sys.executable, "-m", "sandbox.notebooks.server"], env=environment, stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log_file.close()
        running = RunningServer(spec=spec, process=process)
        self._wait_ready(running)
        log.info("notebook_server_started", job=job_id, pid=process.pid)
        return running

    def _wait_ready(self, running: RunningServer) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        transport = httpx.HTTPTransport(uds=running.spec.socket)
        with httpx.Client(transport=transport, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not running.alive:
                    raise NotebookUnavailable(f"the notebook server for {running.spec.job} exited while starting; "
                                              "see its server.log")
                if Path(running.spec.socket).exists():
                    try:
                        answer = client.get(f"http://localhost{running.spec.base_url}api/status",
                                            headers={"Authorization": f"token {running.spec.internal_token}"})
                        if answer.status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                time.sleep(0.05)
        self._terminate(running)
        raise NotebookUnavailable(f"the notebook server for {running.spec.job} did not start in {START_TIMEOUT_S} s")

    def get(self, job_id: str) -> RunningServer | None:
        with self._lock:
            running = self._servers.get(job_id)
        return running if running is not None and running.alive else None

    def stop(self, job_id: str) -> None:
        """Stop the server (its kernels shut down with it), remove what is left, and drop the workspace."""
        with self._lock:
            running = self._servers.pop(job_id, None)
        if running is not None:
            self._terminate(running)
        self._remove_kernels(notebook=job_id)
        directory = self.session_dir(job_id)
        if directory.exists():
            try:
                remove(directory)
            except OSError as error:
                log.warning("notebook_workspace_not_removed", job=job_id, error=str(error))
        shutil.rmtree(self.runtime_dir(job_id), ignore_errors=True)

    def stop_all(self) -> None:
        with self._lock:
            jobs = list(self._servers)
        for job_id in jobs:
            with self._lock:
                running = self._servers.pop(job_id, None)
            if running is not None:
                self._terminate(running)
        self._remove_kernels()

    def reap(self) -> int:
        """Remove this instance's kernel containers that no live server of this process owns."""
        with self._lock:
            owned = {job for job, server in self._servers.items() if server.alive}
        return self._remove_kernels(keep=owned)

    def _terminate(self, running: RunningServer) -> None:
        if running.alive:
            os.killpg(running.process.pid, signal.SIGTERM)
            try:
                running.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(running.process.pid, signal.SIGKILL)
                running.process.wait(timeout=10)

    def _remove_kernels(self, *, notebook: str | None = None, keep: set[str] | None = None) -> int:
        from sandbox.notebooks.kernels import LABEL_NOTEBOOK, live_kernels

        try:
            import docker

            client = docker.from_env()
            containers = live_kernels(client, instance_id=self.instance.instance_id, notebook=notebook)
        except Exception as error:  # no engine: nothing to remove
            log.warning("notebook_kernels_not_listed", error=str(error))
            return 0
        removed = 0
        for container in containers:
            if keep is not None and container.labels.get(LABEL_NOTEBOOK) in keep:
                continue
            try:
                container.remove(force=True)
                removed += 1
            except Exception as error:
                log.warning("notebook_kernel_not_removed", container=container.name, error=str(error))
        return removed
