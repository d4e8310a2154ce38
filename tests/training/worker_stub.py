"""A stand-in for the worker's side of a dp_training container: `POST /training/data` (served once, then
409, as the worker does) and `POST /training/progress`, over HTTP on a Unix socket, from a thread.

For each data request it notes who asked (the peer's pid, from SO_PEERCRED) and which other processes then
ran in the asker's PID namespace, and once the data is served it leaves a `served` file beside the socket."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import socketserver
import struct
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np


def npz_bytes(x: np.ndarray, y: np.ndarray, unit: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, X=x, y=y, unit=unit)
    return buffer.getvalue()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    stub: WorkerStub


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # the name http.server dispatches to
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        stub = self.server.stub
        if self.path == "/training/data":
            pid, _, _ = struct.unpack("3i", self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                    struct.calcsize("3i")))
            with stub.lock:
                stub.askers.append(DataRequest(pid, neighbours(pid)))
                first = stub.data_requests == 1
            if first:
                self._send(200, stub.data, "application/octet-stream")
                stub.served.touch()
            else:
                self._send(409, json.dumps({"title": "Conflict", "detail": "already served"}).encode(),
                           "application/json")
        elif self.path == "/training/progress":
            stub.progress.append(json.loads(body))
            self._send(200, b"{}", "application/json")
        else:
            self._send(404, b"{}", "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib names it `format`
        return


@dataclass(frozen=True)
class DataRequest:
    pid: int
    neighbours: list[str]   # the other processes in the asker's PID namespace then: "pid command line"


def neighbours(pid: int) -> list[str]:
    """The processes other than `pid` in its PID namespace (on the host's /proc: a namespace's processes all
    show there), each as "pid command line"."""
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pid:
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
            if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry} {command.strip()}")
    return found


def socket_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="dpsock-", dir="/tmp"))  # Unix socket paths are short


class WorkerStub:
    """Serves `data` (npz bytes) once at a short socket path; records progress posts."""

    def __init__(self, data: bytes, folder: Path | None = None) -> None:
        """`folder`: where the socket goes (a worker coming back serves the same path); else a new one."""
        self.data = data
        self.askers: list[DataRequest] = []
        self.progress: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.folder = folder or socket_folder()
        self.path = self.folder / "dp.sock"
        self.served = self.folder / "served"
        self._server = _Server(str(self.path), _Handler)
        self._server.stub = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def data_requests(self) -> int:
        return len(self.askers)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)
        self.served.unlink(missing_ok=True)
        self.folder.rmdir()
