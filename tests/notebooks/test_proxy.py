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
from collections.abc import Callable, Iterator
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

# The proxy is about HTTP and sockets, not the store (test_notebooks.py runs on both): SQLite only.
SQLITE_WORLD = pytest.mark.parametrize("nb_world", ["sqlite"], indirect=True, scope="module")

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


@SQLITE_WORLD
def test_the_climb_target_is_real_and_unforwarded(nb_world: NotebookWorld) -> None:
    """The control: the Jupyter server answers the target, and the proxy refuses it asked plainly."""
    session = nb_world.session("trusted")
    status, kind, _ = _raw_get(session["url"], "api/config/notebook", session["token"])
    assert status == 404 and kind.startswith("application/problem+json")
    status, _, body = _raw_get(session["url"], "api/status", session["token"])
    assert status == 200, body


def assert_climbs_refused(session: dict[str, Any], paths: list[str]) -> None:
    """Each path is refused by the proxy (problem+json, or 400 from the HTTP layer), never answered upstream."""
    reached = []
    for path in paths:
        status, kind, body = _raw_get(session["url"], path, session["token"])
        if status < 300 or not (kind.startswith("application/problem+json") or status == 400):
            reached.append(f"{path} -> {status} {kind} {body[:80]}")
    assert not reached, "the allow-list was bypassed:\n" + "\n".join(reached)


@SQLITE_WORLD
def test_encoded_climbs_never_reach_the_server(nb_world: NotebookWorld) -> None:
    assert_climbs_refused(nb_world.session("trusted"), CLIMBS)


@contextlib.contextmanager
def _bearer_kernel_socket(session: dict[str, Any], jwt: Callable[[], str]) -> Iterator[Any]:
    """A kernel started with the session token, its websocket opened with the service JWT that `jwt` mints
    once the kernel is up (a short-lived token must not spend its life on the kernel's start)."""
    token = {"Authorization": f"token {session['token']}"}
    started = httpx.post(f"{session['url']}api/kernels", headers=token, json={"name": "sandbox"}, timeout=60)
    assert started.status_code == 201, started.text
    kernel_id = started.json()["id"]
    url = session["url"].replace("http://", "ws://") + f"api/kernels/{kernel_id}/channels"
    socket = connect(f"{url}?session_id={uuid.uuid4().hex}", additional_headers=auth(jwt()), open_timeout=30)
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


@SQLITE_WORLD
def test_a_revoked_jwt_closes_its_open_kernel_socket(nb_world: NotebookWorld, quick_checks: None) -> None:
    issued = nb_world.instance.issue_token(sub="revoked-later", org="acme", role=Role.BUYER, ttl_s=3600)
    with _bearer_kernel_socket(nb_world.session("trusted"), lambda: issued.token) as socket:
        assert _closed_within(socket, 1.5) is None, "the socket closed before anything was revoked"
        nb_world.instance.revoke_token(issued.jti)
        closed = _closed_within(socket, 15)
        assert closed is not None, "a revoked token's kernel socket stayed open"
        assert closed.rcvd is not None and closed.rcvd.code == 1008, closed


@SQLITE_WORLD
def test_an_expired_jwt_closes_its_open_kernel_socket(nb_world: NotebookWorld, quick_checks: None) -> None:
    instance = nb_world.instance
    leeway = instance.settings.token_leeway_s
    instance.settings.token_leeway_s = 0
    instance.__dict__.pop("verifier", None)  # built from the settings once; rebuilt with no leeway
    try:
        def expires_soon() -> str:
            return instance.issue_token(sub="expires-soon", org="acme", role=Role.BUYER, ttl_s=8).token

        with _bearer_kernel_socket(nb_world.session("trusted"), expires_soon) as socket:
            closed = _closed_within(socket, 30)
            assert closed is not None and closed.rcvd is not None and closed.rcvd.code == 1008, \
                "an expired token's kernel socket stayed open"
    finally:
        instance.settings.token_leeway_s = leeway
        instance.__dict__.pop("verifier", None)


@SQLITE_WORLD
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


@SQLITE_WORLD
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


# -- JupyterLab in a browser: its routes, the session cookie, and the Origin rule --------------------------------------

LAB_ROUTES = ["lab", "lab/tree/a b.ipynb", "lab/tree/notes/x..y.ipynb", "lab/workspaces/default",
              "lab/workspaces/auto-x/tree/nb.ipynb", "lab/api/settings",
              "lab/api/settings/@jupyterlab/codemirror-extension:plugin", "lab/api/translations/default",
              "lab/api/workspaces/default", "lab/api/themes/@jupyterlab/theme-light-extension/index.css",
              "lab/extensions/jupyterlab_pygments/static/remoteEntry.5cbb.js", "static/lab/main.efd3.js",
              "static/favicons/favicon-busy-1.ico"]
NOT_FOR_BROWSERS = ["api/terminals", "api/terminals/1", "terminals/websocket/1", "lab/api/extensions",
                    "lab/api/extensions/x", "lab/api/build", "lab/api/plugins", "lab/api/listings/x.json",
                    "lab/api/news", "lab/api/update", "lab/api/licenses", "api/shutdown", "api/events",
                    "api/events/subscribe", "api/nbconvert", "nbconvert/html/a.ipynb", "api/config/notebook",
                    "api/security/csp-report", "lab/workspaces/a/b", "lab/workspaces/a.b", "lab/apix", "lab/", "doc",
                    "tree", "notebooks/a.ipynb", "static/style/x.css", "static/lab", "lab/extensions", "login",
                    "logout"]
LAB_CLIMBS = ["static/lab/../../api/config/notebook", "static/lab/%2e%2e/%2e%2e/api/shutdown",
              "lab/tree/../../api/terminals", "lab/tree/..;/..;/api/shutdown", "lab/tree/%252e%252e/api/shutdown",
              "lab/extensions/%2e%2e/%2e%2e/api/shutdown", "lab/extensions/x/..%2f..%2f..%2fapi/shutdown",
              "lab/api/settings/..%5c..%5capi/shutdown", "lab/api/workspaces/%2e%2e/extensions",
              "lab/workspaces/x/tree/../../../api/events/subscribe", "static/favicons/%00/../../api/shutdown",
              "lab/tree//../api/shutdown"]


@pytest.mark.parametrize("path", LAB_ROUTES)
def test_jupyterlabs_routes_are_forwarded(path: str) -> None:
    assert forwardable_path(path, f"/notebooks/j/{path.replace(' ', '%20')}".encode()) == path


@pytest.mark.parametrize("path", NOT_FOR_BROWSERS)
def test_routes_lab_does_not_get_are_refused(path: str) -> None:
    with pytest.raises(NotFound):
        forwardable_path(path, f"/notebooks/j/{path}".encode())


@pytest.mark.parametrize("path", LAB_CLIMBS)
def test_no_climb_out_of_labs_prefixes(path: str) -> None:
    from urllib.parse import unquote

    with pytest.raises(NotFound):
        forwardable_path(unquote(path.replace("%2f", "/")), f"/notebooks/j/{path}".encode())


def _connection(headers: dict[str, str], *, method: str = "POST", kind: str = "http", scheme: str = "http",
                query: str = "") -> Any:
    from starlette.requests import HTTPConnection

    scope = {"type": kind, "method": method, "scheme": scheme, "path": "/notebooks/j/api/contents",
             "query_string": query.encode(), "server": ("svc.example", 8000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return HTTPConnection(scope)


def test_credentials_come_from_the_header_then_the_query_then_the_cookie() -> None:
    from sandbox.api.routes.notebook_proxy import SESSION_COOKIE, _credentials

    cookie = {"Cookie": f"other=1; {SESSION_COOKIE}=from-cookie"}
    assert _credentials(_connection(cookie)).token == "from-cookie"
    assert _credentials(_connection(cookie)).source == "cookie"
    assert _credentials(_connection(cookie, query="token=from-query")).source == "query"
    both = _credentials(_connection({**cookie, "Authorization": "token from-header"}, query="token=q"))
    assert (both.token, both.source) == ("from-header", "header")
    bearer = _credentials(_connection({**cookie, "Authorization": "Bearer a.b.c"}))
    assert (bearer.jwt, bearer.token, bearer.source) == ("a.b.c", None, "bearer")
    assert _credentials(_connection({"Cookie": "other=1"})).source == "none"
    assert _credentials(_connection({"Cookie": f"{SESSION_COOKIE}="})).source == "none"


def test_cookie_requests_that_change_things_and_cookie_websockets_need_the_services_origin() -> None:
    from sandbox.api.routes.notebook_proxy import SESSION_COOKIE, _credentials, check_origin
    from sandbox.errors import Forbidden

    def check(headers: dict[str, str], public_url: str | None = None, **scope: Any) -> bool:
        connection = _connection({"Host": "svc.example:8000", "Cookie": f"{SESSION_COOKIE}=t", **headers}, **scope)
        try:
            check_origin(connection, _credentials(connection), public_url)
        except Forbidden:
            return False
        return True

    assert check({"Origin": "http://svc.example:8000"})
    assert check({"Origin": "HTTP://SVC.example:8000"}), "origins compare without case"
    for origin in ("http://evil.example", "null", "https://svc.example:8000", "http://svc.example:8000.evil.example",
                   "http://svc.example"):
        assert not check({"Origin": origin}), origin
    assert not check({}), "a cookie POST without an Origin"
    for method in ("PUT", "PATCH", "DELETE"):
        assert not check({"Origin": "http://evil.example"}, method=method)
    assert check({"Origin": "http://evil.example"}, method="GET"), "reads are not checked (SameSite guards them)"
    assert not check({"Origin": "http://evil.example"}, kind="websocket", method="GET")
    assert not check({}, kind="websocket")
    assert check({"Origin": "http://svc.example:8000"}, kind="websocket", scheme="ws")
    assert check({"Origin": "https://svc.example:8000"}, kind="websocket", scheme="wss")
    # Behind a TLS proxy the request is plain http on another host: the public URL names the origin.
    assert check({"Origin": "https://notebooks.example"}, public_url="https://notebooks.example/")
    assert not check({"Origin": "https://evil.example"}, public_url="https://notebooks.example/")
    # A client that presents its credential itself needs no Origin.
    token = {"Authorization": "token t", "Origin": "http://evil.example"}
    assert check(token) and check(token, kind="websocket")
    assert check({"Origin": "http://evil.example"}, query="token=t")


def test_the_lab_page_config_carries_no_token_paths_or_builds() -> None:
    from sandbox.notebooks.jupyter.server import DISABLED_LAB_PLUGINS, browser_page_config

    given = {"token": "internal-secret", "serverRoot": "/home/x/notebooks/j/mnt", "appSettingsDir": "/venv/x",
             "userSettingsDir": "/home/x", "labextensionsPath": ["/venv/share"], "buildAvailable": True,
             "buildCheck": True, "disabledExtensions": ["some-plugin"], "baseUrl": "/notebooks/j/"}
    shown = browser_page_config(None, dict(given))
    assert "internal-secret" not in json.dumps(shown)
    assert shown["token"] == "" and shown["serverRoot"] == "" and not shown["buildAvailable"]
    assert not any(key.endswith("Dir") for key in shown) and "labextensionsPath" not in shown
    assert shown["disabledExtensions"] == ["some-plugin", *DISABLED_LAB_PLUGINS]
    assert shown["baseUrl"] == "/notebooks/j/"


@SQLITE_WORLD
def test_the_lab_url_swaps_its_token_for_a_strict_cookie(nb_world: NotebookWorld) -> None:
    from sandbox.api.routes.notebook_proxy import SESSION_COOKIE

    session = nb_world.session("trusted")
    path = f"/notebooks/{session['id']}/"
    answer = httpx.get(f"{session['url']}lab/tree/a%20b.ipynb?reset&token={session['token']}")
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == f"{path}lab/tree/a%20b.ipynb?reset=", answer.headers["location"]
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}={session['token']};"), cookie
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert "httponly" in flags and flags["samesite"].lower() == "samesite=strict", cookie
    assert flags["path"] == f"Path={path}" and "secure" not in flags, cookie
    assert 0 < int(flags["max-age"].split("=")[1]) <= 3600 * 24, cookie
    assert session["token"] not in answer.text
    # Only a page trades the token: an API request with `?token=` is answered as before, with no cookie.
    api = httpx.get(f"{session['url']}api/status?token={session['token']}")
    assert api.status_code == 200 and "set-cookie" not in api.headers
    refused = httpx.get(f"{session['url']}lab?token=not-{session['token']}")
    assert refused.status_code == 403 and "set-cookie" not in refused.headers
    settings = nb_world.instance.settings
    settings.public_url = "https://notebooks.example"
    try:
        secure = httpx.get(f"{session['url']}lab?token={session['token']}")
        assert "secure" in secure.headers["set-cookie"].lower(), "a service served over TLS sets a Secure cookie"
    finally:
        settings.public_url = None
    page = httpx.get(f"{session['url']}lab", cookies={SESSION_COOKIE: session["token"]})
    assert page.status_code == 200 and "jupyter-config-data" in page.text, page.text[:200]


@SQLITE_WORLD
def test_lab_climbs_never_reach_the_server(nb_world: NotebookWorld) -> None:
    session = nb_world.session("trusted")
    assert_climbs_refused(session, LAB_CLIMBS)
    status, _, body = _raw_get(session["url"], "api/status", session["token"])
    assert status == 200, body


@SQLITE_WORLD
def test_jupyters_html_error_page_does_not_carry_the_servers_token(nb_world: NotebookWorld) -> None:
    """Jupyter's HTML error page names the server's token (`page.html`): only its status reaches the client."""
    session = nb_world.session("trusted")
    internal = nb_world.server(session["id"]).spec.internal_token
    for path in ("files/missing.py", "lab/tree/missing.ipynb", "lab/workspaces/x/tree/y"):
        answer = httpx.get(f"{session['url']}{path}", headers={"Authorization": f"token {session['token']}"})
        assert internal not in answer.text and internal not in str(answer.headers), f"{path} carried the token"
    missing = httpx.get(f"{session['url']}files/missing.py", headers={"Authorization": f"token {session['token']}"})
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json", missing.text
