"""The DP endpoint inside a job: HTTP over a per-job Unix socket, mounted at /run/sandbox/dp.sock.

Which socket a connection arrives on says which job (and so which contract and org) asks; the
job never presents a token. Queries go through exactly the same service, rules and ledger as
`POST /v1/queries`.
"""

from __future__ import annotations

import json
import os
import re
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sandbox.errors import SandboxError
from sandbox.logs import get_logger

log = get_logger("sandbox.dp.socket")
MAX_REQUEST_BYTES = 64 * 1024

QueryHandler = Callable[[dict[str, Any]], dict[str, Any]]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handle_query: QueryHandler


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30  # a body shorter than its Content-Length must not hold a thread for ever

    def do_POST(self) -> None:  # the name http.server dispatches to
        if self.path != "/query":
            self._answer(404, {"title": "Not found", "detail": "POST /query is the only endpoint"})
            return
        declared = (self.headers.get("Content-Length") or "").strip()
        if self.headers.get("Transfer-Encoding") or re.fullmatch(r"[0-9]{1,9}", declared) is None:
            self._answer(411, {"title": "Length required",
                               "detail": "send one JSON object with a Content-Length, not chunked"})
            return
        length = int(declared)
        if length <= 0 or length > MAX_REQUEST_BYTES:
            self._answer(413, {"title": "Payload too large", "detail": f"send 1 to {MAX_REQUEST_BYTES} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length), parse_constant=_refuse_constant)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            self._answer(200, self.server.handle_query(body))
        except SandboxError as exc:
            self._answer(exc.status, {"title": exc.title, "detail": exc.detail, **exc.extra})
        except (ValueError, ValidationError) as exc:
            self._answer(422, {"title": "Invalid request", "detail": str(exc)[:2000]})
        except Exception as exc:  # a bug must not kill the server thread or leak a stack trace
            log.error("dp_socket_query_failed", error=str(exc), exc_info=exc)
            self._answer(500, {"title": "Internal error", "detail": "the query failed; it has been logged"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps({"status": status, **body}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "job"

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib names it `format`
        return


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class DpSocket:
    """One job's DP socket: bound at `path` (the only entry of its folder), served by a thread."""

    def __init__(self, path: Path, handle_query: QueryHandler) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)  # noqa: S103 - the job's uid must reach the socket; nothing else is here
        path.unlink(missing_ok=True)  # a socket left by a worker that died; the job reconnects to the new one
        self._server = _Server(str(path), _Handler)
        self._server.handle_query = handle_query
        os.chmod(path, 0o666)  # noqa: S103 - connect() needs write permission on the socket inode
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"dp-socket-{path.parent.name}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)
