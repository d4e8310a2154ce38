"""JupyterLab in headless Chromium, through the service's notebook proxy, on a real worker and Docker kernel.

A buyer opens the lab URL that `sandbox notebook start` prints: the token becomes an HttpOnly, SameSite=Strict
cookie for the session's path and leaves the address bar; Lab runs an aggregate-tier cell that prints raw rows
and sees only the withheld notice, and a DP query's platform-rendered answer. No response the browser gets
carries the server's internal token. Another site cannot use the cookie: a cross-origin POST or websocket is
refused, a browser without the cookie gets 401, and an open kernel socket closes when its token is revoked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import Tokens, auth
from nbworld import DATASET, NotebookWorld, make_notebook_world
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from sandbox.api.routes.notebook_proxy import SESSION_COOKIE
from sandbox.audit import SystemActor
from sandbox.auth.tokens import Role
from sandbox.config import Settings
from sandbox.instance import Instance, init_instance
from sandbox.notebooks.sessions import session_token_expiry

pytestmark = [pytest.mark.browser, pytest.mark.docker]

FOREIGN_ORIGIN = "http://evil.example"
READ_ROWS = f"import pandas as pd; print(pd.read_parquet('/data/{DATASET}.parquet').head(30).to_string())"
DP_QUERY = ("from sandbox_client import dp; answer = dp.query("
            f"'SELECT sex, COUNT(*) AS n FROM \"{DATASET}\" GROUP BY sex', epsilon=0.3)")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotebookWorld]:
    """One service, worker and aggregate session for the module (SQLite: the store is not under test here)."""
    tmp = tmp_path_factory.mktemp("lab")
    settings = Settings(home=tmp / "home", log_json=True, notebook_cull_interval_s=1)
    init_instance(settings)
    instance = Instance(settings)
    try:
        yield from make_notebook_world(instance, Tokens(instance), tmp)
    finally:
        instance.close()


@pytest.fixture(scope="module")
def session(world: NotebookWorld) -> dict[str, Any]:
    return world.session("aggregate")


@pytest.fixture(autouse=True)
def clean_lab(session: dict[str, Any]) -> None:
    """Each test starts with no kernel and a fresh Lab workspace. The tests share one session, whose policy
    allows two kernels: a workspace Lab restores reopens the last test's notebooks, and kernels a test left
    (or Lab had not yet shut down) would count against the limit of the next one."""
    token = {"Authorization": f"token {session['token']}"}
    with httpx.Client(base_url=session["url"], headers=token, timeout=60) as client:
        spaces = client.get("lab/api/workspaces")
        if spaces.status_code == 200:
            for space in spaces.json().get("workspaces", {}).get("ids", []):
                client.delete(f"lab/api/workspaces/{space}")
        for running in client.get("api/sessions").json():
            client.delete(f"api/sessions/{running['id']}")
        for kernel in client.get("api/kernels").json():
            client.delete(f"api/kernels/{kernel['id']}")
        deadline = time.monotonic() + 60
        while client.get("api/kernels").json() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not client.get("api/kernels").json(), "kernels outlived their deletion"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={token}"}


def _kernel_id(session: dict[str, Any]) -> str:
    """A kernel of the session: the one Lab started, or a new one."""
    token = {"Authorization": f"token {session['token']}"}
    kernels = httpx.get(f"{session['url']}api/kernels", headers=token, timeout=60).json()
    if kernels:
        return str(kernels[0]["id"])
    started = httpx.post(f"{session['url']}api/kernels", headers=token, json={"name": "sandbox"}, timeout=60)
    assert started.status_code == 201, started.text
    return str(started.json()["id"])


def _refused_on_purpose(response: Any, session: dict[str, Any]) -> bool:
    """Lab asks for what the service refuses by design, whatever its plugins say: nbconvert's export formats
    (exports are not forwarded); and, for a path in a cell under the mouse, `resolvePath` and that path's
    contents (the kernel's files do not exist for the browser)."""
    path = urlsplit(response.url).path.removeprefix(f"/notebooks/{session['id']}/")
    return path in ("api/nbconvert", "api/resolvePath") or (
        response.status == 404 and path.startswith("api/contents/") and not path.endswith(".ipynb"))


def _open_new_notebook(page: Any, session: dict[str, Any], name: str) -> None:
    """Create an empty notebook in the workspace and open it in Lab by its URL.

    Not through the launcher: Lab's "new notebook" asks for two sessions at once under two temporary
    paths and deletes one, and a cell typed while the browser is still bound to the deleted one never
    runs (a known leftover; opening an existing notebook makes one session).
    """
    notebook = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [], "execution_count": None}],
                "metadata": {"kernelspec": {"name": "sandbox", "display_name": "Python 3 (sandbox)",
                                            "language": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    created = httpx.put(f"{session['url']}api/contents/{name}", timeout=60,
                        headers={"Authorization": f"token {session['token']}"},
                        json={"type": "notebook", "format": "json", "content": notebook})
    assert created.status_code in (200, 201), created.text
    page.goto(f"{session['url']}lab/tree/{name}")
    page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").first.wait_for()


def _answer_dialog(page: Any) -> None:
    """Answer a dialog Lab shows, as a person would, or fail with its words: a dialog blocks every click, and a
    click's timeout says only that something was in the way.

    "Select Kernel" is expected: a cell run while the notebook's kernel container is still starting (slow on
    a busy machine) makes Lab ask which kernel to use; the researcher picks the sandbox's, the only one.
    """
    dialog = page.locator(".jp-Dialog")
    if not dialog.count():
        return
    text = dialog.first.inner_text()
    if "Select Kernel" not in text or "Python 3 (sandbox)" not in text:
        raise AssertionError(f"JupyterLab shows a dialog: {text!r}")
    dialog.first.locator("button:has-text('Select')").click()
    dialog.first.wait_for(state="detached")


def _run_cell(page: Any, index: int, code: str) -> Any:
    """Type `code` into the notebook's cell `index` and run it; its output area."""
    editor = page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").nth(index).locator(".cm-content")
    editor.wait_for()
    for _ in range(20):  # a click that lands while Lab is still attaching the editor types nowhere: again
        _answer_dialog(page)
        editor.click()
        page.keyboard.insert_text(code)  # no key events: the editor's bracket closing does not rewrite the code
        if code[:20] in editor.inner_text():
            break
        page.wait_for_timeout(250)
    cell = page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    for _ in range(10):
        # A run asked for while Lab still connects the notebook to its kernel is dropped (the prompt stays
        # "[ ]"); one that was taken shows "[*]" or a count, and is never asked for twice.
        _answer_dialog(page)
        editor.click()
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function("p => /\\[[*0-9]/.test(p.textContent)", arg=prompt.element_handle(),
                                   timeout=5_000)
            break
        except PlaywrightTimeout:
            continue
    output = cell.locator(".jp-OutputArea-output")
    output.first.wait_for(timeout=90_000)  # the first cell waits for the kernel container to start
    return output


def test_lab_runs_an_aggregate_cell_and_the_browser_sees_no_rows_and_no_server_token(
        world: NotebookWorld, session: dict[str, Any], new_page: Any) -> None:
    internal_token = world.server(session["id"]).spec.internal_token
    page = new_page()
    responses: list[Any] = []
    frames: list[str | bytes] = []
    page.on("response", lambda response: responses.append(response))
    page.on("websocket", lambda socket: socket.on("framereceived", lambda frame: frames.append(frame)))

    assert session["lab_url"] == f"{session['url']}lab?token={session['token']}"
    page.goto(session["lab_url"])
    page.locator("#jp-main-dock-panel").wait_for()
    assert page.url == f"{session['url']}lab", f"the token stayed in the address bar: {page.url}"

    cookies = [c for c in page.context.cookies() if c["name"] == SESSION_COOKIE]
    assert len(cookies) == 1, cookies
    cookie = cookies[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
    assert cookie["path"] == f"/notebooks/{session['id']}/", cookie
    assert not cookie["secure"], "plain http here: a Secure cookie would never be sent back"
    with world.instance.read_context(SystemActor()) as ctx:
        expires = session_token_expiry(ctx, session["token"]).timestamp()
    assert 0 < cookie["expires"] <= expires + 1, "the cookie outlives the session token"

    _open_new_notebook(page, session, "rows.ipynb")
    rows = _run_cell(page, 0, READ_ROWS)
    rows.filter(has_text="withheld").first.wait_for(timeout=90_000)
    answer = _run_cell(page, 1, DP_QUERY)
    answer.filter(has_text="recorded by the platform").first.wait_for(timeout=90_000)
    shown_answer = answer.first.inner_text()
    assert "sex" in shown_answer and "F" in shown_answer and "M" in shown_answer, shown_answer

    shown = page.locator(".jp-NotebookPanel:visible").inner_text()
    assert "notebook-unverified" in shown, shown
    received = [shown, *(f if isinstance(f, str) else f.decode("utf-8", "replace") for f in frames)]
    assert frames, "Lab's kernel websocket (authenticated by the cookie) carried nothing"
    leaked = [pid for pid in world.patient_ids() if any(pid in text for text in received)]
    assert not leaked, f"{len(leaked)} patient ids reached the browser, e.g. {leaked[:3]}"

    carried = []
    for response in responses:
        headers = "\n".join(f"{k}: {v}" for k, v in response.all_headers().items())
        try:
            body = response.body().decode("utf-8", "replace")
        except Exception:  # a redirect has no body to read
            body = ""
        if internal_token in headers or internal_token in body:
            carried.append(f"{response.status} {response.url}")
        if session["token"] in body:
            carried.append(f"{response.status} {response.url} (the session token, in a body a script can read)")
    assert len(responses) > 20 and not carried, "responses carried a token:\n" + "\n".join(carried)
    assert not any(internal_token in (f if isinstance(f, str) else f.decode("latin-1")) for f in frames)
    refused = [f"{r.status} {r.url}" for r in responses if r.status >= 400 and not _refused_on_purpose(r, session)]
    assert not refused, "Lab asked for routes the proxy does not forward:\n" + "\n".join(refused)


def test_a_researcher_opens_jupyterlab_from_the_buyer_page_and_runs_a_dp_query(
        world: NotebookWorld, session: dict[str, Any], new_page: Any, sign_in: Any) -> None:
    """The acceptance path: the console's buyer page, its button, JupyterLab, a DP query in a cell."""
    base = world.url.rstrip("/")
    page = new_page()
    sign_in(page, base, world.buyer)
    page.click("header nav a:has-text('Notebooks')")
    contract = world.contracts["aggregate"]
    row = page.locator("#openable tbody tr", has=page.locator(f"input[name=contract][value='{contract}']"))
    row.locator("button:has-text('Open in JupyterLab')").click()
    page.locator("#jp-main-dock-panel").wait_for()
    # The running session is reused, and the new session token left the address bar for the cookie.
    assert page.url == f"{session['url']}lab", page.url
    _open_new_notebook(page, session, "from-console.ipynb")
    answer = _run_cell(page, 0, DP_QUERY)
    answer.filter(has_text="recorded by the platform").first.wait_for(timeout=90_000)
    shown = answer.first.inner_text()
    assert "sex" in shown and "F" in shown and "M" in shown, shown


def test_a_browser_without_the_cookie_gets_401_on_the_lab_page(session: dict[str, Any], new_page: Any) -> None:
    page = new_page()
    answer = page.goto(f"{session['url']}lab")
    assert answer is not None and answer.status == 401, answer.status if answer else None
    assert "jupyter-config-data" not in page.content()


def test_another_site_cannot_use_the_cookie(world: NotebookWorld, session: dict[str, Any], new_page: Any) -> None:
    """A page on another origin in the buyer's browser (with the cookie) posts to the session: nothing is
    created. SameSite keeps the cookie home, and the proxy would refuse its Origin besides."""
    page = new_page()
    page.goto(session["lab_url"])
    page.locator(".jp-DirListing-content").first.wait_for()  # Lab restores the saved layout: no launcher now
    elsewhere = session["url"].replace("127.0.0.1", "localhost")  # another site, the same service
    page.goto(f"{_origin(elsewhere)}/v1/catalog")
    statuses = page.evaluate(
        """async (url) => {
            const made = await fetch(url + "api/contents", {method: "POST", mode: "no-cors", credentials: "include",
                                                             body: JSON.stringify({type: "file", ext: ".txt"})});
            return made.type;
        }""", session["url"])
    assert statuses == "opaque"
    listing = httpx.get(f"{session['url']}api/contents", headers={"Authorization": f"token {session['token']}"})
    assert listing.status_code == 200, listing.text
    made = [item["name"] for item in listing.json()["content"] if item["name"].startswith("untitled")
            and item["name"].endswith(".txt")]
    assert not made, f"a cross-site POST created {made} with the buyer's cookie"


def test_cookie_requests_that_change_things_need_the_services_origin(session: dict[str, Any]) -> None:
    own = _origin(session["url"])
    name = f"csrf-{uuid.uuid4().hex[:8]}"
    url = f"{session['url']}lab/api/workspaces/{name}"
    workspace = {"data": {}, "metadata": {"id": name}}
    for origin in (FOREIGN_ORIGIN, None, "null", own + ".evil.example"):
        headers = {**_cookie(session["token"]), **({"Origin": origin} if origin else {})}
        refused = httpx.put(url, headers=headers, json=workspace)
        assert refused.status_code == 403, f"Origin {origin}: {refused.status_code} {refused.text}"
    accepted = httpx.put(url, headers={**_cookie(session["token"]), "Origin": own}, json=workspace)
    assert accepted.status_code == 204, accepted.text
    read = httpx.get(f"{session['url']}api/status", headers=_cookie(session["token"]))
    assert read.status_code == 200, "a GET with the cookie needs no Origin"
    api_client = httpx.put(url, headers={"Authorization": f"token {session['token']}"}, json=workspace)
    assert api_client.status_code == 204, "an API client's own token needs no Origin"
    wrong = httpx.get(f"{session['url']}api/status", headers=_cookie("not-" + session["token"]))
    assert wrong.status_code == 403, wrong.text


def test_a_kernel_websocket_with_the_cookie_needs_the_services_origin(session: dict[str, Any]) -> None:
    kernel = _kernel_id(session)
    url = session["url"].replace("http://", "ws://") + f"api/kernels/{kernel}/channels?session_id={uuid.uuid4().hex}"
    for origin in (FOREIGN_ORIGIN, None):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers={**_cookie(session["token"]), **({"Origin": origin} if origin else {})},
                    open_timeout=30).close()
        assert refused.value.response.status_code == 403, f"Origin {origin}: {refused.value.response.status_code}"
    with connect(url, additional_headers={**_cookie(session["token"]), "Origin": _origin(session["url"])},
                 open_timeout=30) as socket:
        assert socket.protocol.state.name == "OPEN"


def test_a_cookie_socket_closes_when_its_token_is_revoked(world: NotebookWorld, session: dict[str, Any]) -> None:
    issued = world.instance.issue_token(sub="lab-revoked-later", org="acme", role=Role.BUYER, ttl_s=3600)
    again = world.http.post("/v1/notebooks", headers=auth(issued.token),
                            json={"contract": world.contracts["aggregate"], "dataset": DATASET})
    assert again.status_code == 201 and again.json()["id"] == session["id"], again.text
    token = again.json()["token"]
    kernel = _kernel_id(session)
    url = session["url"].replace("http://", "ws://") + f"api/kernels/{kernel}/channels?session_id={uuid.uuid4().hex}"
    settings = world.instance.settings
    before = settings.notebook_access_check_s
    settings.notebook_access_check_s = 0.5
    try:
        with connect(url, additional_headers={**_cookie(token), "Origin": _origin(session["url"])},
                     open_timeout=30) as socket:
            world.instance.revoke_token(issued.jti)
            deadline = time.monotonic() + 15
            closed: ConnectionClosed | None = None
            while closed is None and time.monotonic() < deadline:
                try:
                    socket.recv(timeout=0.5)
                except TimeoutError:
                    continue
                except ConnectionClosed as error:
                    closed = error
            assert closed is not None and closed.rcvd is not None and closed.rcvd.code == 1008, \
                "a revoked token's cookie kept its kernel socket open"
    finally:
        settings.notebook_access_check_s = before
    gone = httpx.get(f"{session['url']}lab", headers=_cookie(token))
    assert gone.status_code == 403, gone.text


def test_two_session_requests_at_once_for_one_notebook_share_one_kernel(session: dict[str, Any]) -> None:
    """Lab opening a notebook may ask for its session twice at once; the second must not start a second kernel."""
    import concurrent.futures

    headers = {"Authorization": f"token {session['token']}"}
    body = {"path": f"twice-{uuid.uuid4().hex[:8]}.ipynb", "type": "notebook", "kernel": {"name": "sandbox"}}
    before = {k["id"] for k in httpx.get(f"{session['url']}api/kernels", headers=headers, timeout=60).json()}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{session['url']}api/sessions", headers=headers, json=body,
                                                     timeout=120), range(2)))
    assert all(a.status_code == 201 for a in answers), [a.text for a in answers]
    kernels = {a.json()["kernel"]["id"] for a in answers}
    assert len(kernels) == 1, f"two requests for one notebook started {len(kernels)} kernels"
    after = {k["id"] for k in httpx.get(f"{session['url']}api/kernels", headers=headers, timeout=60).json()}
    assert after - before == kernels
    httpx.delete(f"{session['url']}api/sessions/{answers[0].json()['id']}", headers=headers, timeout=60)


def test_asking_a_session_for_a_kernel_by_name_keeps_its_running_kernel(session: dict[str, Any]) -> None:
    """A cell run before Lab has bound the notebook to its session makes Lab ask for a kernel by name once the
    session exists. The session keeps the kernel it runs: no second container, and no switch that would drop
    the cells Lab had sent to the first."""
    headers = {"Authorization": f"token {session['token']}"}
    body = {"path": f"early-{uuid.uuid4().hex[:8]}.ipynb", "type": "notebook", "kernel": {"name": "sandbox"}}
    created = httpx.post(f"{session['url']}api/sessions", headers=headers, json=body, timeout=120)
    assert created.status_code == 201, created.text
    kernel = created.json()["kernel"]["id"]
    url = f"{session['url']}api/sessions/{created.json()['id']}"
    try:
        asked = httpx.patch(url, headers=headers, json={"kernel": {"name": "sandbox"}}, timeout=120)
        assert asked.status_code == 200, asked.text
        assert asked.json()["kernel"]["id"] == kernel, "the session changed to a new kernel"
        assert [k["id"] for k in httpx.get(f"{session['url']}api/kernels", headers=headers, timeout=60).json()] \
            == [kernel]
        other = httpx.patch(url, headers=headers, json={"kernel": {"name": "python3"}}, timeout=120)
        assert other.status_code >= 400 and "only the 'sandbox' kernel" in other.text, other.text
        assert httpx.get(url, headers=headers, timeout=60).json()["kernel"]["id"] == kernel
    finally:
        httpx.delete(url, headers=headers, timeout=60)
