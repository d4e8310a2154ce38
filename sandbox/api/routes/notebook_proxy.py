"""The only way to a notebook server: HTTP and WebSocket through the API, after the session's checks.

Clients (JupyterLab, VS Code, jupyter_client) use `<service>/notebooks/<id>/` with the session token as
Jupyter expects it (`Authorization: token ...` or `?token=`), or the service's own JWT as a bearer token.
The proxy checks it on every request and every websocket, strips it, and talks to the server over its
Unix socket with a token only the service knows. Only the Jupyter APIs a client needs are forwarded.

The worker runs the servers (`sandbox.notebooks.servers`). The proxy finds a session's server where the
worker announced it (`sandbox.notebooks.endpoint`); while there is none, or it does not answer (a session
just started, a worker restarting), the proxy wakes an embedded worker and waits, up to SERVER_WAIT_S,
then answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

import httpx
import websockets
from fastapi import APIRouter, Request, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import unix_connect

from sandbox.audit import SystemActor
from sandbox.auth.tokens import Principal
from sandbox.errors import Conflict, Forbidden, NotFound, SandboxError, Unauthorized
from sandbox.instance import Instance
from sandbox.notebooks.endpoint import ServerEndpoint, ServerFailure, read_server, server_dir
from sandbox.notebooks.sessions import session_access
from sandbox.security_log import SecurityLog, audit_refusal, mark_recorded, was_recorded

router = APIRouter(tags=["notebooks"], include_in_schema=False)

# How long a request waits for the worker to bring a session's server up (`app.state` may say otherwise).
SERVER_WAIT_S = 30.0
POLL_S = 0.2

# What a Jupyter client needs; terminals, nbconvert, server shutdown, events and extensions are not forwarded.
FORWARDED = re.compile(r"^(api/?|api/(status|me|kernelspecs|kernels|sessions|contents)(/.*)?|files/.+|kernelspecs/.+)$")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length", "content-encoding", "authorization",
                        "cookie", "host", "set-cookie", "origin", "referer"})
MAX_WS_MESSAGE = 64 * 1024 * 1024
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_DECODINGS = 8


def forwardable_path(path: str, raw_path: bytes | None) -> str:
    """The path below `/notebooks/<id>/`, refused (404) if any decoding of it could leave the allow-list.

    The allow-list once matched `api/kernels/%2e%2e/...`, which the upstream client then normalised to
    another API (review 11.15). So the path is percent-decoded until it stops changing, and every form of
    it is checked: no dot segment (`..`, `.`, `..;x`), no backslash, no encoded slash, no control
    character, no empty segment but a trailing one. What is forwarded must be what was checked, so a
    path that still decodes after the one decoding every server does (double encoding) is refused too.
    The allow-list is checked last, on that path.
    """
    if raw_path is not None and _ENCODED_SEPARATOR.search(raw_path.decode("latin-1")):
        raise NotFound("an encoded slash or backslash is not forwarded through the notebook proxy")
    form = path
    for _ in range(MAX_DECODINGS):
        problem = _path_problem(form)
        if problem:
            raise NotFound(f"{problem} is not forwarded through the notebook proxy")
        try:
            decoded = unquote(form, errors="strict")
        except UnicodeDecodeError:
            raise NotFound("a path that does not decode to UTF-8 is not forwarded through the notebook proxy") from None
        if decoded == form:
            break
        form = decoded
    else:
        raise NotFound("a path encoded this many times is not forwarded through the notebook proxy")
    if form != path:
        raise NotFound("a double-encoded path is not forwarded through the notebook proxy")
    if not FORWARDED.match(path):
        raise NotFound(f"/{path} is not available through the notebook proxy")
    return path


def _path_problem(form: str) -> str | None:
    if "\\" in form or _ENCODED_SEPARATOR.search(form):
        return "a backslash or an encoded slash"
    if _CONTROL.search(form):
        return "a control character"
    segments = form.split("/")
    if any(segment.split(";", 1)[0] in (".", "..") for segment in segments):
        return "a dot segment"
    if any(not segment for segment in segments[:-1]):
        return "an empty segment"
    return None


def _credentials(headers: Any, query: Any) -> tuple[str | None, str | None]:
    """(session token, bearer JWT) from the request, whichever was given."""
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "token" and value.strip():
        return value.strip(), None
    if scheme.lower() == "bearer" and value.strip():
        return None, value.strip()
    token = query.get("token")
    return (token, None) if token else (None, None)


def _authorise(instance: Instance, job_id: str, headers: Any, query: Any) -> Principal | None:
    """The verified service-token caller, if one was given; raises when access is refused."""
    token, jwt = _credentials(headers, query)
    if token is None and jwt is None:
        raise Unauthorized("a notebook session token (Authorization: token ...) or a bearer token is needed")
    principal: Principal | None = None
    if jwt is not None:
        principal = instance.verifier.verify(jwt)
        if instance.is_revoked(principal.jti):
            raise Unauthorized("token revoked")
    try:
        with instance.read_context(principal) if principal else _system_read(instance) as ctx:
            session_access(ctx, job_id, token=token, principal=principal)
    except Forbidden as refusal:
        if principal is not None:  # an identified caller: the refusal is theirs, on the audit chain
            audit_refusal(instance, principal, action="notebook.access.denied", status=refusal.status,
                          method="-", route="/notebooks/{job_id}", object_id=job_id, reason=refusal.detail)
            mark_recorded(refusal)
        raise
    return principal


@contextlib.contextmanager
def _system_read(instance: Instance) -> Any:
    with instance.read_context(SystemActor()) as ctx:
        yield ctx


def _wake_worker(connection: HTTPConnection) -> None:
    """An embedded worker looks at once (`jobs.wake_worker`, for a websocket as for a request)."""
    wake = getattr(connection.app.state, "wake_worker", None)
    if wake is not None:
        wake()


class NotebookUnavailable(SandboxError):
    status = 503
    title = "Notebook server unavailable"
    slug = "notebook-unavailable"


async def _check_access(instance: Instance, job_id: str, connection: HTTPConnection) -> None:
    try:
        await run_in_threadpool(_authorise, instance, job_id, connection.headers, connection.query_params)
    except (Unauthorized, Forbidden) as refusal:
        # Nobody identified (no token, a bad one, a session token that opens nothing): the rate-limited
        # security log with bounded fields, never the signed chain (review 11.11).
        if not was_recorded(refusal):
            security_log: SecurityLog = connection.app.state.security_log
            security_log.refusal(client=connection.client.host if connection.client else None,
                                 status=refusal.status, method=connection.scope.get("method", "WEBSOCKET"),
                                 path=connection.url.path, reason=refusal.detail)
            mark_recorded(refusal)
        raise
    except Conflict:  # the session ended (stopped, cancelled): the worker takes its server down
        _wake_worker(connection)
        raise


Answer = TypeVar("Answer")


async def _with_server(connection: HTTPConnection, job_id: str,
                       attempt: Callable[[ServerEndpoint], Awaitable[Answer]]) -> Answer:
    """`attempt` against the session's server, once the worker has it up; 503 if it does not within the wait.

    Only a failure to connect is retried: nothing reached the server, so no request runs twice.
    """
    instance: Instance = connection.app.state.instance
    folder = server_dir(instance.settings, instance.instance_id, job_id)
    wait_s = float(getattr(connection.app.state, "notebook_server_wait_s", SERVER_WAIT_S))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        announced = await run_in_threadpool(read_server, folder)
        if isinstance(announced, ServerFailure):
            raise NotebookUnavailable(f"the notebook server of session {job_id} could not start: {announced.detail}; "
                                      "the worker tries again shortly")
        if announced is not None:
            try:
                return await attempt(announced)
            except (httpx.ConnectError, ConnectionError, FileNotFoundError):
                pass  # gone since it was announced: the worker notices and starts another
        _wake_worker(connection)
        if loop.time() >= deadline:
            raise NotebookUnavailable(
                f"no worker brought the notebook server of session {job_id} up within {wait_s:.0f} s; the session "
                "is kept, and answers once a worker runs (`sandbox worker`, or `sandbox serve` with its embedded "
                "worker)")
        await asyncio.sleep(POLL_S)


@router.api_route("/notebooks/{job_id}/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def forward(job_id: str, path: str, request: Request) -> Response:
    instance: Instance = request.app.state.instance
    path = forwardable_path(path, request.scope.get("raw_path"))
    await _check_access(instance, job_id, request)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    query = httpx.QueryParams([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
    body = await request.body()

    async def send(server: ServerEndpoint) -> httpx.Response:
        transport = httpx.AsyncHTTPTransport(uds=server.socket)
        async with httpx.AsyncClient(transport=transport, timeout=120.0) as client:
            return await client.request(request.method, f"http://localhost{server.base_url}{path}", params=query,
                                        headers={**headers, "authorization": f"token {server.internal_token}"},
                                        content=body)

    try:
        answer = await _with_server(request, job_id, send)
    except httpx.TransportError as error:
        raise _Unavailable(f"the notebook server did not answer: {error}") from error
    kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
    return Response(content=answer.content, status_code=answer.status_code, headers=kept)


class _Unavailable(SandboxError):
    status = 502
    title = "Bad gateway"
    slug = "bad-gateway"


@router.websocket("/notebooks/{job_id}/{path:path}")
async def forward_websocket(websocket: WebSocket, job_id: str, path: str) -> None:
    instance: Instance = websocket.app.state.instance
    raw_path = websocket.scope.get("raw_path")
    if not re.fullmatch(r"api/kernels/[0-9a-f-]{36}/channels", path) or (
            raw_path is not None and b"%" in raw_path):
        await websocket.close(code=1008, reason="not a kernel channel")
        return
    try:
        await _check_access(instance, job_id, websocket)
    except SandboxError as error:
        await websocket.close(code=1008, reason=error.detail[:120])
        return
    query = "&".join(f"{k}={v}" for k, v in websocket.query_params.multi_items() if k != "token")
    protocols = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]

    async def connect(server: ServerEndpoint) -> Any:
        uri = f"ws://localhost{server.base_url}{path}" + (f"?{query}" if query else "")
        return await unix_connect(server.socket, uri, subprotocols=protocols or None,
                                  additional_headers={"Authorization": f"token {server.internal_token}"},
                                  max_size=MAX_WS_MESSAGE, compression=None, ping_interval=None)

    try:
        upstream = await _with_server(websocket, job_id, connect)
    except NotebookUnavailable as error:
        await websocket.close(code=1013, reason=error.detail[:120])  # 1013: try again later
        return
    except (OSError, websockets.exceptions.WebSocketException):
        await websocket.close(code=1011, reason="the kernel is not reachable")
        return
    await websocket.accept(subprotocol=upstream.subprotocol)

    async def client_to_kernel() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes") if message.get("bytes") is not None else message.get("text")
            if data is not None:
                await upstream.send(data)

    async def kernel_to_client() -> None:
        async for data in upstream:
            if isinstance(data, bytes):
                await websocket.send_bytes(data)
            else:
                await websocket.send_text(data)

    lapsed: list[str] = []

    async def access_lapses() -> None:
        # The socket lives as long as the right to it: a revoked or expired token (session token or JWT),
        # an ended session, or a revoked or expired contract closes it at the next look.
        while True:
            await asyncio.sleep(instance.settings.notebook_access_check_s)
            try:
                await run_in_threadpool(_authorise, instance, job_id, websocket.headers, websocket.query_params)
            except SandboxError as error:
                lapsed.append(error.detail[:120])
                return

    tasks = [asyncio.create_task(client_to_kernel()), asyncio.create_task(kernel_to_client()),
             asyncio.create_task(access_lapses())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await upstream.close()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            if lapsed:
                await websocket.close(code=1008, reason=f"access ended: {lapsed[0]}"[:120])
            else:
                await websocket.close()
