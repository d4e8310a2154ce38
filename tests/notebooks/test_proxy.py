"""The notebook proxy: no encoding of a path climbs out of its allow-list, open kernel websockets close when
the right to them ends, and a relayed output's audit event has already committed (review 11.15, 11.12).

Paths are sent byte for byte (http.client), since httpx would normalise some of them before sending.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import auth
from nbworld import DATASET, JupyterKernel, NotebookWorld
from sqlalchemy import select
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from sandbox.api.routes.notebook_proxy import forwardable_path
from sandbox.auth.tokens import Role
from sandbox.errors import NotFound
from sandbox.store.models import AuditEvent

# Each climbs from an allowed prefix to `api/config/notebook`, which the proxy does not forward but the
# Jupyter server answers (200): reaching it means the allow-list was bypassed.
CLIMBS = [
    "api/kernels/%2e%2e/config/notebook",
    "api/kernels/%2E%2e/config/notebook",
    "api/kernels/.%2e/config/notebook",
    "api/kernels/%2e./config/notebook",
    "api/kernels/../config/notebook",
    "api/kernels/%252e%252e/config/notebook",
    "api/kernels/%25252e%25252e/config/notebook",
    "api/kernels/%%32%65%%32%65/config/notebook",
    "api/kernels/..;/config/notebook",
    "api/kernels/..%3b/config/notebook",
    "api/kernels/..%3bx=1/config/notebook",
    "api/kernels/%2e%2e%2fconfig/notebook",
    "api/kernels/..%2Fconfig%2Fnotebook",
    "api/kernels/%252e%252e%252fconfig/notebook",
    "api/kernels/..%5cconfig/notebook",
    "api/kernels/..%255cconfig/notebook",
    "api/contents/%2e%2e/%2e%2e/api/config/notebook",
    "files/..%2f..%2fapi/config/notebook",
    "kernelspecs/%2e%2e/%2e%2e/api/config/notebook",
    "api/sessions/x/%2e%2e/%2e%2e/config/notebook",
    "api/kernels/./../config/notebook",
    "api/kernels/%2e/%2e%2e/config/notebook",
    "api/kernels//../config/notebook",
    "api/kernels/%00/../config/notebook",
]


@pytest.mark.parametrize("path", CLIMBS)
def test_every_encoding_of_a_climb_is_refused_before_the_allow_list(path: str) -> None:
    starlette_path = path.replace("%2f", "/").replace("%2F", "/")  # what a server decodes once
    from urllib.parse import unquote

    with pytest.raises(NotFound):
        forwardable_path(unquote(starlette_path), f"/notebooks/j/{path}".encode())


@pytest.mark.parametrize("path", ["api", "api/", "api/status", "api/kernels", "api/kernels/", "api/contents/a b.ipynb",
                                  "api/contents/notes/x.y.ipynb", "files/out/plot.png", "kernelspecs/sandbox/logo.svg",
                                  "api/contents/..hidden", "api/contents/a..b"])
def test_ordinary_paths_are_forwarded(path: str) -> None:
    assert forwardable_path(path, f"/notebooks/j/{path.replace(' ', '%20')}".encode()) == path


def _raw_get(url: str, path: str, token: str) -> tuple[int, str, str]:
    """GET `url`+`path` with the path bytes exactly as written."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        connection.putrequest("GET", parts.path + path, skip_accept_encoding=True)
        connection.putheader("Authorization", f"token {token}")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.getheader("content-type") or "", response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def test_the_climb_target_is_real_and_unforwarded(nb_world: NotebookWorld) -> None:
    """The control: the Jupyter server answers the target, and the proxy refuses it asked plainly."""
    session = nb_world.session("trusted")
    status, kind, _ = _raw_get(session["url"], "api/config/notebook", session["token"])
    assert status == 404 and kind.startswith("application/problem+json")
    status, _, body = _raw_get(session["url"], "api/status", session["token"])
    assert status == 200, body


def test_encoded_climbs_never_reach_the_server(nb_world: NotebookWorld) -> None:
    session = nb_world.session("trusted")
    reached = []
    for path in CLIMBS:
        status, kind, body = _raw_get(session["url"], path, session["token"])
        if status < 300 or not (kind.startswith("application/problem+json") or status == 400):
            reached.append(f"{path} -> {status} {kind} {body[:80]}")
    assert not reached, "the allow-list was bypassed:\n" + "\n".join(reached)


@contextlib.contextmanager
def _bearer_kernel_socket(session: dict[str, Any], jwt: str) -> Iterator[Any]:
    """A kernel started with the session token, its websocket opened with the service JWT `jwt`."""
    token = {"Authorization": f"token {session['token']}"}
    started = httpx.post(f"{session['url']}api/kernels", headers=token, json={"name": "sandbox"}, timeout=60)
    assert started.status_code == 201, started.text
    kernel_id = started.json()["id"]
    url = session["url"].replace("http://", "ws://") + f"api/kernels/{kernel_id}/channels"
    socket = connect(f"{url}?session_id={uuid.uuid4().hex}", additional_headers=auth(jwt), open_timeout=30)
    try:
        yield socket
    finally:
        socket.close()
        httpx.delete(f"{session['url']}api/kernels/{kernel_id}", headers=token, timeout=60)


def _closed_within(socket: Any, seconds: float) -> ConnectionClosed | None:
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                socket.recv(timeout=0.5)
            except TimeoutError:
                continue
    except ConnectionClosed as closed:
        return closed
    return None


@pytest.fixture
def quick_checks(nb_world: NotebookWorld) -> Iterator[None]:
    settings = nb_world.instance.settings
    before = settings.notebook_access_check_s
    settings.notebook_access_check_s = 0.5
    yield
    settings.notebook_access_check_s = before


def test_a_revoked_jwt_closes_its_open_kernel_socket(nb_world: NotebookWorld, quick_checks: None) -> None:
    issued = nb_world.instance.issue_token(sub="revoked-later", org="acme", role=Role.BUYER, ttl_s=3600)
    with _bearer_kernel_socket(nb_world.session("trusted"), issued.token) as socket:
        assert _closed_within(socket, 1.5) is None, "the socket closed before anything was revoked"
        nb_world.instance.revoke_token(issued.jti)
        closed = _closed_within(socket, 15)
        assert closed is not None, "a revoked token's kernel socket stayed open"
        assert closed.rcvd is not None and closed.rcvd.code == 1008, closed


def test_an_expired_jwt_closes_its_open_kernel_socket(nb_world: NotebookWorld, quick_checks: None) -> None:
    instance = nb_world.instance
    leeway = instance.settings.token_leeway_s
    instance.settings.token_leeway_s = 0
    instance.__dict__.pop("verifier", None)  # built from the settings once; rebuilt with no leeway
    try:
        issued = instance.issue_token(sub="expires-soon", org="acme", role=Role.BUYER, ttl_s=5)
        with _bearer_kernel_socket(nb_world.session("trusted"), issued.token) as socket:
            closed = _closed_within(socket, 30)
            assert closed is not None and closed.rcvd is not None and closed.rcvd.code == 1008, \
                "an expired token's kernel socket stayed open"
    finally:
        instance.settings.token_leeway_s = leeway
        instance.__dict__.pop("verifier", None)


def test_a_revoked_contract_closes_its_sessions_sockets(nb_world: NotebookWorld, quick_checks: None) -> None:
    created = nb_world.http.post("/v1/contracts", headers=auth(nb_world.steward), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "trusted", "kinds": ["notebook"],
        "purpose": "revoked while open", "valid_until": "2099-01-01", "epsilon": 1.0,
        "quotas": {"concurrent_jobs": 2, "cpu_hours": 1}})
    assert created.status_code == 201, created.text
    contract = created.json()["id"]
    started = nb_world.http.post("/v1/notebooks", headers=auth(nb_world.buyer),
                                 json={"contract": contract, "dataset": DATASET})
    assert started.status_code == 201, started.text
    session = started.json()
    nb_world.sessions.append(session["id"])
    kernel = JupyterKernel(session["url"], session["token"])
    nb_world.kernels.append(kernel)
    assert "ok" in kernel.execute("print('ok')").stdout
    revoked = nb_world.http.post(f"/v1/contracts/{contract}/revoke", headers=auth(nb_world.steward))
    assert revoked.status_code == 200, revoked.text
    closed = _closed_within(kernel.ws, 15)
    assert closed is not None, "a kernel socket stayed open after its contract was revoked"


def test_an_output_reaches_the_client_only_after_its_audit_event_committed(nb_world: NotebookWorld) -> None:
    """Audit before release: the moment the client holds an output, its record is in the database, so a
    server killed right after relaying cannot have lost it."""
    kernel = nb_world.shared_kernel("trusted")
    session_id = nb_world.session("trusted")["id"]
    for attempt in range(5):
        marker = f"released-{attempt}-{uuid.uuid4().hex[:6]}"
        msg_id = kernel.send("execute_request", {"code": f"print({marker!r})", "silent": False,
                                                 "store_history": True, "user_expressions": {},
                                                 "allow_stdin": False, "stop_on_error": True})
        while True:
            message = kernel.receive(timeout=60)
            if message.get("parent_header", {}).get("msg_id") == msg_id and message["msg_type"] == "stream":
                break
        # Read at once, before anything else: no waiting, no retry.
        with nb_world.instance.read_session() as db:
            cells = [e.details.get("cell") for e in db.execute(select(AuditEvent).where(
                AuditEvent.action == "notebook.output", AuditEvent.object_id == session_id)).scalars()
                if e.details.get("msg_type") == "stream"]
        assert msg_id in cells, f"attempt {attempt}: the client had the output before its audit event committed"
        while True:  # let the cell finish before the next
            message = kernel.receive(timeout=60)
            if (message.get("parent_header", {}).get("msg_id") == msg_id and message["msg_type"] == "status"
                    and message["content"]["execution_state"] == "idle"):
                break
    assert json.dumps(cells)
