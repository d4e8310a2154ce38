"""JSON over HTTP on a Unix socket: how processes on one machine ask each other for work.

The worker serves its own socket (`worker_socket`) for the API process, which holds no data and no
Docker socket: DP queries, mock publication, notebook exports and the like run in the worker, beside
the data, and the API only checks, forwards and records. The same server serves each job's and each
kernel's DP socket. Who may connect is decided by the socket file's mode and owner, not by a token.

A handler's `SandboxError` travels back as its status, title, slug and detail, and `call` raises it
again on the caller's side as a `RemoteProblem` that keeps them, so a forwarded refusal reads exactly
as a local one would.
"""

from __future__ import annotations

import json
import os
import re
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from sandbox.errors import SandboxError
from sandbox.logs import get_logger
from sandbox.security_log import mark_recorded, was_recorded

log = get_logger("sandbox.local_http")
MAX_REQUEST_BYTES = 64 * 1024

Handler = Callable[[dict[str, Any]], dict[str, Any]]
# A handler that may also answer raw bytes (application/octet-stream): a training run's rows, say.
BytesHandler = Callable[[dict[str, Any]], "dict[str, Any] | bytes"]


def worker_socket(socket_root: Path, instance_id: str) -> Path:
    """Where the worker of an instance serves the API (short enough for a Unix socket path)."""
    return socket_root / instance_id / "worker.sock"


class WorkerUnavailable(SandboxError):
    status = 503
    title = "Worker unavailable"
    slug = "worker-unavailable"


class WorkerTimeout(SandboxError):
    status = 504
    title = "Worker timeout"
    slug = "worker-timeout"


class RemoteProblem(SandboxError):
    """A refusal that another process's handler raised, carried over with its status and title.

    A 429's `retry_after_s` comes back as its Retry-After header, as a local TooManyRequests sets it.
    """

    def __init__(self, status: int, title: str, slug: str, detail: str, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.status, self.title, self.slug = status, title, slug
        retry_after = extra.get("retry_after_s")
        if isinstance(retry_after, int) and not isinstance(retry_after, bool) and retry_after >= 0:
            self.headers = {"Retry-After": str(retry_after)}


# Set on a refusal's body when the serving process already put it on the audit chain (a 403 inside
# Instance.context): the caller then marks its RemoteProblem recorded and does not record it again.
RECORDED_FIELD = "refusal_recorded"


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # The listen backlog: socketserver's default of 5 refuses a burst of concurrent callers outright
    # (connect() on a full Unix socket backlog fails at once with EAGAIN).
    request_queue_size = 256
    routes: Mapping[str, BytesHandler]
    max_request_bytes: int
    peer_name: str


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30  # a body shorter than its Content-Length must not hold a thread for ever

    def do_POST(self) -> None:  # the name http.server dispatches to
        handle = self.server.routes.get(self.path)
        if handle is None:
            known = ", ".join(f"POST {route}" for route in sorted(self.server.routes))
            self._answer(404, {"title": "Not found", "detail": f"the endpoints here are: {known}"})
            return
        declared = (self.headers.get("Content-Length") or "").strip()
        if self.headers.get("Transfer-Encoding") or re.fullmatch(r"[0-9]{1,9}", declared) is None:
            self._answer(411, {"title": "Length required",
                               "detail": "send one JSON object with a Content-Length, not chunked"})
            return
        length, limit = int(declared), self.server.max_request_bytes
        if length < 0 or length > limit:
            self._answer(413, {"title": "Payload too large", "detail": f"send 0 to {limit} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length), parse_constant=_refuse_constant) if length else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            answer = handle(body)
            if isinstance(answer, bytes):
                self._send(200, answer, "application/octet-stream")
            else:
                self._answer(200, answer)
        except SandboxError as exc:
            recorded = {RECORDED_FIELD: True} if was_recorded(exc) else {}
            self._answer(exc.status, {"title": exc.title, "slug": exc.slug, "detail": exc.detail, **exc.extra,
                                      **recorded})
        except (ValueError, ValidationError) as exc:
            self._answer(422, {"title": "Invalid request", "slug": "invalid", "detail": str(exc)[:2000]})
        except Exception as exc:  # a bug must not kill the server thread or leak a stack trace
            log.error("local_http_request_failed", path=self.path, error=str(exc), exc_info=exc)
            self._answer(500, {"title": "Internal error", "slug": "internal",
                               "detail": "the request failed; it has been logged"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        # A refusal carries its status in the body too, as problem+json does; an answer is sent as it is
        # (it may have a `status` of its own, an output's release state, say).
        self._send(status, json.dumps(body if status == 200 else {"status": status, **body}).encode(),
                   "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return self.server.peer_name

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib names it `format`
        return


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class LocalHttpServer:
    """Serves `routes` (path -> handler) at the Unix socket `path`, from a thread.

    `mode` is the socket's own mode: 0o600 lets only this user connect (the API, same uid);
    a job's DP socket is 0o666 because the job's uid must connect, and its folder holds nothing else.
    """

    def __init__(self, path: Path, routes: Mapping[str, BytesHandler], *, mode: int = 0o600,
                 folder_mode: int = 0o700, max_request_bytes: int = MAX_REQUEST_BYTES,
                 peer_name: str = "local") -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, folder_mode)
        path.unlink(missing_ok=True)  # left by a process that died; clients reconnect to the new one
        self._server = _Server(str(path), _Handler)
        self._server.routes = dict(routes)
        self._server.max_request_bytes = max_request_bytes
        self._server.peer_name = peer_name
        os.chmod(path, mode)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"local-http-{path.parent.name}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


CONNECT_RETRY_S = 1.0


def _post(client: httpx.Client, route: str, body: dict[str, Any]) -> httpx.Response:
    """POST once; a refused connection (a full backlog, a server starting) is tried again for a moment.
    Nothing was sent on a connection that failed to open, so trying again cannot run a request twice."""
    deadline = time.monotonic() + CONNECT_RETRY_S
    while True:
        try:
            return client.post(f"http://local{route}", json=body)
        except httpx.ConnectError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def call(path: Path, route: str, body: dict[str, Any], *, timeout_s: float = 60.0,
         unavailable: str = "the worker is not running") -> dict[str, Any]:
    """POST `body` to `route` on the socket at `path`; a refusal there is raised here as RemoteProblem.

    Nothing listening is WorkerUnavailable (503); no answer within `timeout_s` is WorkerTimeout (504).
    """
    if not path.exists():
        raise WorkerUnavailable(f"{unavailable} (no socket at {path}); start `sandbox worker`")
    # Plain HTTP on a Unix socket: no TLS, so no certificate store to load (that costs ~35 ms a call).
    transport = httpx.HTTPTransport(uds=str(path), verify=False)
    try:
        with httpx.Client(transport=transport, timeout=timeout_s) as client:
            answer = _post(client, route, body)
    except httpx.TimeoutException as exc:
        raise WorkerTimeout(f"the worker did not answer {route} within {timeout_s:.0f} s ({type(exc).__name__}); "
                            "ask again later") from exc
    except httpx.TransportError as exc:
        raise WorkerUnavailable(f"{unavailable} ({type(exc).__name__} on {path})") from exc
    try:
        payload = answer.json()
    except ValueError as exc:
        raise WorkerUnavailable(f"the worker answered {answer.status_code} without JSON") from exc
    if not isinstance(payload, dict):
        raise WorkerUnavailable("the worker answered with something other than a JSON object")
    if answer.status_code == 200:
        return payload
    payload.pop("status", None)
    title = str(payload.pop("title", "Error"))
    slug = str(payload.pop("slug", title.lower().replace(" ", "-")))
    detail = str(payload.pop("detail", ""))
    recorded = payload.pop(RECORDED_FIELD, False) is True
    problem = RemoteProblem(answer.status_code, title, slug, detail, **payload)
    if recorded:
        mark_recorded(problem)
    raise problem
