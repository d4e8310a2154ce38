"""What a notebook server process is told about its session: written by the worker, read by the server."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPEC_ENV = "SANDBOX_NOTEBOOK_SPEC"

# Kernel limits when the policy's `notebooks` section does not set them.
DEFAULTS: dict[str, Any] = {
    "allow_comms": False,
    "max_output_kb": 256,
    "max_kernels_per_contract": 2,
    "idle_timeout_s": 1800,
    "kernel_cpus": 1.0,
    "kernel_memory_mb": 2048,
    "max_kernel_hours": 12,
    "workspace_mb": 200,
    "max_messages_per_s": 200,
}


def notebook_settings(policy: dict[str, Any]) -> dict[str, Any]:
    """The policy's `notebooks` section over the defaults."""
    return {**DEFAULTS, **(policy.get("notebooks") or {})}


@dataclass(frozen=True)
class SessionSpec:
    job: str  # the notebook session is a job of kind `notebook`; exports are its outputs
    org: str
    contract: str
    dataset: str
    version: int
    tier: str
    policy: str  # name@version
    image_id: str
    base_url: str  # /notebooks/<job>/
    socket: str  # the server's Unix socket
    internal_token: str  # what the proxy presents to the server (`endpoint.server.json`); never leaves the service
    workspace: str  # host folder (a quota file system): the contents root, /output in kernels
    code_dir: str  # host folder mounted read-only at /code (empty: code lives in the workspace)
    data_files: dict[str, str]  # name in /data -> host file (`sandbox.jobs.mounts.job_data`: the mock for dp_only)
    kernel_root: str  # short host folder for per-kernel IPC and DP socket folders
    settings: dict[str, Any]  # the service's settings, so the server opens the same store and artifacts
    cull_interval_s: int = 60
    data_folders: dict[str, str] = field(default_factory=dict)  # name in /data -> host folder (file collections)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(asdict(self), handle)

    @classmethod
    def read(cls, path: Path) -> SessionSpec:
        return cls(**json.loads(path.read_text()))

    @classmethod
    def from_environment(cls) -> SessionSpec:
        return cls.read(Path(os.environ[SPEC_ENV]))
