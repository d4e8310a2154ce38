"""The only way to a notebook server: HTTP and WebSocket through the API, after the session's checks.

Clients (JupyterLab, VS Code, jupyter_client) use `<service>/notebooks/<id>/` with the session token as
Jupyter expects it (`Authorization: token ...` or `?token=`), or the service's own JWT as a bearer token.
The proxy checks it on every request and every websocket, strips it, and talks to the server over its
Unix socket with a token only the service knows. Only the Jupyter APIs a client needs are forwarded, and
JupyterLab's page with the routes it loads.

A browser opens `<service>/notebooks/<id>/lab?token=<session token>`: the proxy checks the token, sets a
cookie that carries it (HttpOnly, SameSite=Strict, this session's path, Secure over TLS, expiring with
the token) and redirects to the URL without it. The cookie then stands for the token, checked as the
token is on every request, but a request it authenticates that changes something (POST, PUT, PATCH,
DELETE) or opens a kernel websocket must come from the service's own origin (`Origin`): another site's
page cannot use the buyer's browser to run code or read outputs (cross-site request forgery, cross-site
websocket hijacking).

The worker runs the servers (`sandbox.notebooks.servers`). The proxy finds a session's server where the
worker announced it (`sandbox.notebooks.endpoint`); while there is none, or it does not answer (a session
just started, a worker restarting), the proxy wakes an embedded worker and waits, up to SERVER_WAIT_S,
then answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import httpx
import websockets
from fastapi import APIRouter, Request, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import unix_connect

from sandbox.api.origins import over_tls, own_origins
from sandbox.audit import SystemActor
from sandbox.auth.tokens import Principal
from sandbox.errors import Conflict, Forbidden, NotFound, SandboxError, Unauthorized
from sandbox.instance import Instance
from sandbox.notebooks.endpoint import ServerEndpoint, ServerFailure, read_server, server_dir
from sandbox.notebooks.sessions import session_access, session_token_expiry
from sandbox.security_log import SecurityLog, audit_refusal, mark_recorded, was_recorded

router = APIRouter(tags=["notebooks"], include_in_schema=False)

# How long a request waits for the worker to bring a session's server up (`app.state` may say otherwise).
SERVER_WAIT_S = 30.0
POLL_S = 0.2

# What a Jupyter client needs, and JupyterLab's page, static files, settings, themes, translations and
# workspaces. Terminals, nbconvert, server shutdown, events, Lab's extension manager, builds and plugin
# switches are not forwarded.
FORWARDED = re.compile(
    r"^(api/?|api/(status|me|kernelspecs|kernels|sessions|contents)(/.*)?|files/.+|kernelspecs/.+"
    r"|lab(/workspaces/[A-Za-z0-9_-]+)?(/tree/.*)?|lab/api/(settings|translations|workspaces|themes)(/.*)?"
    r"|lab/extensions/.+|static/(lab|favicons)/.+)$")
# JupyterLab's page routes: where a browser arrives with `?token=` and leaves with a cookie.
PAGE = re.compile(r"^lab(/workspaces/[A-Za-z0-9_-]+)?(/tree/.*)?$")
SESSION_COOKIE = "sandbox-notebook"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
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


class Source(StrEnum):
    """Where a request's credential came from."""

    HEADER = "header"  # Authorization: token <session token>
    BEARER = "bearer"  # Authorization: Bearer <service JWT>
    QUERY = "query"  # ?token=<session token>
    COOKIE = "cookie"  # SESSION_COOKIE, set when a browser opened the lab URL
    NONE = "none"


@dataclass(frozen=True)
class Credentials:
    """What a request presents: a session token or a service JWT (or nothing), and from where."""

    token: str | None = None
    jwt: str | None = None
    source: Source = Source.NONE


def _credentials(connection: HTTPConnection) -> Credentials:
    """The request's credentials, the first of: `Authorization` (token or bearer), `?token=`, the cookie."""
    scheme, _, value = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "token" and value.strip():
        return Credentials(token=value.strip(), source=Source.HEADER)
    if scheme.lower() == "bearer" and value.strip():
        return Credentials(jwt=value.strip(), source=Source.BEARER)
    token = connection.query_params.get("token")
    if token:
        return Credentials(token=token, source=Source.QUERY)
    cookie = connection.cookies.get(SESSION_COOKIE)
    if cookie:
        return Credentials(token=cookie, source=Source.COOKIE)
    return Credentials()


def check_origin(connection: HTTPConnection, credentials: Credentials, public_url: str | None) -> None:
    """Refuse (403) a cookie-authenticated request that changes something, or a cookie-authenticated websocket,
    unless it comes from the service's own origin: the browser adds the cookie whoever made the request.

    A client that presents its credential itself (a header, the query) shows that it holds it: no Origin needed.
    """
    if credentials.source is not Source.COOKIE:
        return
    websocket = connection.scope["type"] == "websocket"
    if not websocket and connection.scope.get("method") not in UNSAFE_METHODS:
        return
    origin = connection.headers.get("origin", "").lower()
    if origin not in own_origins(connection, public_url):
        what = "a kernel websocket" if websocket else "a request that changes something"
        raise Forbidden(f"{what} with the session cookie must come from the service's own origin, not "
                        f"{origin[:80] or 'an unnamed one'}")


def _authorise(instance: Instance, job_id: str, credentials: Credentials) -> Principal | None:
    """The verified service-token caller, if one was given; raises when access is refused."""
    token, jwt = credentials.token, credentials.jwt
    if token is None and jwt is None:
        raise Unauthorized("a notebook session token (Authorization: token ..., or open the session's lab URL) "
                           "or a bearer token is needed")
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


async def _check_access(instance: Instance, job_id: str, connection: HTTPConnection) -> Credentials:
    """The request's credentials, once they open the session (and, for the cookie, come from our origin)."""
    credentials = _credentials(connection)
    try:
        check_origin(connection, credentials, instance.settings.public_url)
        await run_in_threadpool(_authorise, instance, job_id, credentials)
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
    return credentials


def _session_cookie(instance: Instance, job_id: str, request: Request, token: str) -> RedirectResponse:
    """303 to the page's URL without the token, setting the cookie that stands for it from then on."""
    with _system_read(instance) as ctx:
        expires = session_token_expiry(ctx, token)
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(request.url.path)
    query = httpx.QueryParams([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
    answer = RedirectResponse(f"{path}?{query}" if query else path, status_code=303)
    answer.set_cookie(SESSION_COOKIE, token, max_age=max(0, int((expires - datetime.now(UTC)).total_seconds())),
                      path=f"/notebooks/{job_id}/", httponly=True, samesite="strict",
                      secure=over_tls(request, instance.settings.public_url))
    answer.headers["cache-control"] = "no-store"
    answer.headers["referrer-policy"] = "no-referrer"
    return answer


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
    credentials = await _check_access(instance, job_id, request)
    if request.method == "GET" and credentials.source is Source.QUERY and credentials.token and PAGE.match(path):
        return await run_in_threadpool(_session_cookie, instance, job_id, request, credentials.token)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    query = httpx.QueryParams([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
    body = await request.body()

    async def send(server: ServerEndpoint) -> tuple[httpx.Response, str]:
        transport = httpx.AsyncHTTPTransport(uds=server.socket)
        async with httpx.AsyncClient(transport=transport, timeout=120.0) as client:
            answer = await client.request(request.method, f"http://localhost{server.base_url}{path}", params=query,
                                          headers={**headers, "authorization": f"token {server.internal_token}"},
                                          content=body)
            return answer, server.internal_token

    try:
        answer, internal_token = await _with_server(request, job_id, send)
    except httpx.TransportError as error:
        raise _Unavailable(f"the notebook server did not answer: {error}") from error
    kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
    # The server's own token opens it to anyone who reaches its socket. JupyterLab would put it in its page
    # (the server's config takes it out: `jupyter.server.browser_page_config`), and Jupyter's HTML error page
    # names it (`page.html`, e.g. a 404 from `files/`): such an error goes on as its status alone.
    secret = internal_token.encode()
    if secret in answer.content or any(secret in f"{k}: {v}".encode() for k, v in kept.items()):
        if answer.status_code < 400:
            raise _Unavailable("the notebook server's answer carried its own token, so it was not relayed")
        problem = {"type": "about:blank", "title": answer.reason_phrase or "Error", "status": answer.status_code,
                   "detail": f"the notebook server answered {answer.status_code}"}
        return Response(content=json.dumps(problem), status_code=answer.status_code,
                        media_type="application/problem+json")
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
                await run_in_threadpool(_authorise, instance, job_id, _credentials(websocket))
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
