"""Where a session's notebook server listens, and what the API needs to talk to it.

The worker starts the server on a Unix socket in the session's server folder,
`<dp_socket_root>/<instance>/nb/<job>/jupyter.sock`, and writes `server.json` beside it (mode 0600): the
server's state, its base URL and the internal token the proxy presents. The API process reads that file
and nothing else of the worker's; in docker-compose the two containers share the folder at the same path.
The worker removes the folder last when it stops a session's server, so its absence means nothing is left.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox.config import Settings

SERVER_FILE = "server.json"
SOCKET_FILE = "jupyter.sock"


def server_dir(settings: Settings, instance_id: str, job_id: str) -> Path:
    """The session's server folder: its socket, `server.json`, and its kernels' IPC and DP folders.

    Short on purpose: Unix socket paths are limited to 108 bytes.
    """
    return servers_root(settings, instance_id) / job_id


def servers_root(settings: Settings, instance_id: str) -> Path:
    return settings.dp_socket_root / instance_id / "nb"


def base_url(job_id: str) -> str:
    return f"/notebooks/{job_id}/"


@dataclass(frozen=True)
class ServerEndpoint:
    """A running server, as the worker announced it once it answered."""

    socket: str
    base_url: str
    internal_token: str  # what the proxy presents to the server; never leaves the service
    pid: int


@dataclass(frozen=True)
class ServerFailure:
    """The worker's last attempt to start the server failed; it tries again later."""

    detail: str


def write_running(folder: Path, endpoint: ServerEndpoint) -> None:
    _write(folder, {"state": "running", **asdict(endpoint)})


def write_failure(folder: Path, failure: ServerFailure) -> None:
    _write(folder, {"state": "failed", **asdict(failure)})


def read_server(folder: Path) -> ServerEndpoint | ServerFailure | None:
    """What the worker last wrote about the session's server; None if nothing (not started, or stopped)."""
    try:
        data = json.loads((folder / SERVER_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("state") == "running":
        return ServerEndpoint(socket=str(data["socket"]), base_url=str(data["base_url"]),
                              internal_token=str(data["internal_token"]), pid=int(data["pid"]))
    if data.get("state") == "failed":
        return ServerFailure(detail=str(data.get("detail", "")))
    return None


def forget_server(folder: Path) -> None:
    (folder / SERVER_FILE).unlink(missing_ok=True)


def _write(folder: Path, data: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = folder / f".{SERVER_FILE}.partial"
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(data, handle)
    os.replace(partial, folder / SERVER_FILE)
