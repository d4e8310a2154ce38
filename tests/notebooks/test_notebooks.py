"""Notebook sessions end to end: a real service on a loopback port, a Jupyter websocket client, kernels in
real hardened containers. What a researcher does, and what a hostile kernel tries."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import httpx
import pytest
from helpers import auth
from nbworld import DATASET, JupyterKernel, NotebookWorld, show_spec

from sandbox.auth.tokens import Role

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PRINT_ROWS = f"import pandas as pd\ndf = pd.read_parquet('/data/{DATASET}.parquet')\nprint(df.head(50).to_string())"


def _no_ids(world: NotebookWorld, text: str) -> None:
    leaked = [pid for pid in world.patient_ids() if pid in text]
    assert not leaked, f"{len(leaked)} patient ids reached the client, e.g. {leaked[:3]}"


# -- sessions and access ----------------------------------------------------------------------------


def test_start_returns_url_and_token_and_reuses_the_server(nb_world: NotebookWorld) -> None:
    first = nb_world.session("dp_only")
    again = nb_world.start("dp_only")
    assert again["id"] == first["id"], "a second start for the same contract and dataset reuses the session"
    assert again["token"] != first["token"]
    assert first["url"] == f"{nb_world.url}/notebooks/{first['id']}/"
    for token in (first["token"], again["token"]):
        status = httpx.get(f"{first['url']}api/status", headers={"Authorization": f"token {token}"})
        assert status.status_code == 200, status.text
    listed = nb_world.http.get("/v1/notebooks", headers=auth(nb_world.buyer)).json()
    assert first["id"] in [s["id"] for s in listed]


def test_other_orgs_and_bad_tokens_get_nothing(nb_world: NotebookWorld) -> None:
    session = nb_world.session("aggregate")
    url = session["url"]
    other = nb_world.instance.issue_token(sub="eve", org="evil-corp", role=Role.BUYER, ttl_s=600).token
    assert httpx.get(f"{url}api/kernels").status_code == 401
    assert httpx.get(f"{url}api/kernels", headers={"Authorization": "token not-a-token"}).status_code == 403
    assert httpx.get(f"{url}api/kernels", headers=auth(other)).status_code == 403
    assert httpx.get(f"{url}api/kernels", params={"token": "guess"}).status_code == 403
    # The session token of one session opens no other session.
    dp_session = nb_world.session("dp_only")
    crossed = httpx.get(f"{url}api/kernels", headers={"Authorization": f"token {dp_session['token']}"})
    assert crossed.status_code == 403
    # Another org cannot start a notebook on this org's contract.
    refused = nb_world.http.post("/v1/notebooks", headers=auth(other),
                                 json={"contract": nb_world.contracts["aggregate"], "dataset": DATASET})
    assert refused.status_code in (403, 404), refused.text
    # The websocket is refused too, before it reaches the kernel.
    kernel = nb_world.shared_kernel("aggregate")
    with pytest.raises(Exception):  # noqa: B017 - the handshake is refused
        JupyterKernel(url, "guess", kernel_id=kernel.id)
    denied = nb_world.audit("notebook.access.denied")
    assert denied, "refused access is audited"


def test_a_revoked_service_token_ends_its_session_tokens(nb_world: NotebookWorld) -> None:
    issued = nb_world.instance.issue_token(sub="temp", org="acme", role=Role.BUYER, ttl_s=600)
    session = nb_world.start("trusted", token=issued.token)
    headers = {"Authorization": f"token {session['token']}"}
    assert httpx.get(f"{session['url']}api/status", headers=headers).status_code == 200
    nb_world.instance.revoke_token(issued.jti)
    assert httpx.get(f"{session['url']}api/status", headers=headers).status_code == 403


def test_only_the_jupyter_apis_a_client_needs_are_forwarded(nb_world: NotebookWorld) -> None:
    session = nb_world.session("dp_only")
    headers = {"Authorization": f"token {session['token']}"}
    assert httpx.post(f"{session['url']}api/terminals", headers=headers).status_code == 404
    assert httpx.get(f"{session['url']}api/nbconvert", headers=headers).status_code == 404
    assert httpx.post(f"{session['url']}api/shutdown", headers=headers).status_code == 404
    # Only the sandbox kernel exists; a kernel on the server's own machine cannot be asked for.
    specs = httpx.get(f"{session['url']}api/kernelspecs", headers=headers).json()
    assert list(specs["kernelspecs"]) == ["sandbox"]
    local = httpx.post(f"{session['url']}api/kernels", headers=headers, json={"name": "python3"})
    assert local.status_code >= 400


# -- the kernel's world -----------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["dp_only", "aggregate"])
def test_data_follows_the_tier(nb_world: NotebookWorld, tier: str) -> None:
    kernel = nb_world.shared_kernel(tier)
    # Written to the workspace and read from the host: an aggregate kernel's prints do not reach the client.
    result = kernel.execute(
        "import hashlib, os\n"
        f"seen = str(sorted(os.listdir('/data'))) + hashlib.sha256(open('/data/{DATASET}.parquet','rb').read())"
        ".hexdigest()\nopen('/output/seen.txt', 'w').write(seen)")
    assert result.reply["content"]["status"] == "ok", result.text
    seen = (nb_world.workspace(nb_world.session(tier)["id"]) / "seen.txt").read_text()
    expected = nb_world.mock_file() if tier == "dp_only" else nb_world.version_file()
    assert hashlib.sha256(expected.read_bytes()).hexdigest() in seen
    assert f"'{DATASET}.parquet'" in seen


def test_network_calls_fail_in_the_kernel(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("dp_only")
    result = kernel.execute(
        "import socket\n"
        "for target in [('1.1.1.1', 53), ('127.0.0.1', 8000)]:\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=2); print('CONNECTED', target)\n"
        "    except OSError as error: print('refused', type(error).__name__)\n"
        "try:\n"
        "    socket.getaddrinfo('pypi.org', 443); print('RESOLVED')\n"
        "except OSError: print('no dns')\n"
        "print(sorted(name for name in __import__('os').listdir('/sys/class/net')))")
    assert "CONNECTED" not in result.stdout and "RESOLVED" not in result.stdout, result.stdout
    assert result.stdout.count("refused") == 2 and "no dns" in result.stdout
    assert "['lo']" in result.stdout, "the kernel's container has no network interface but loopback"


def test_the_kernel_runs_hardened(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("dp_only")
    result = kernel.execute(
        "import os\n"
        "print('uid', os.getuid())\n"
        "for path in ['/etc/x', '/code/x', '/data/x']:\n"
        "    try:\n"
        "        open(path, 'w'); print('WROTE', path)\n"
        "    except OSError: print('read-only', path)\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])")
    assert "uid 10001" in result.stdout
    assert "WROTE" not in result.stdout and result.stdout.count("read-only") == 3
    assert "0000000000000000" in result.stdout, "no capabilities"


def _spent(world: NotebookWorld) -> dict[tuple[str, str], float]:
    budgets = world.http.get("/v1/budgets", headers=auth(world.buyer)).json()
    return {(b["contract"], b["dataset"]): b["epsilon_spent"] for b in budgets}


def test_a_dp_query_from_the_kernel_is_answered_and_charged(nb_world: NotebookWorld) -> None:
    before = _spent(nb_world)
    kernel = nb_world.shared_kernel("dp_only")
    result = kernel.execute(
        "from sandbox_client import dp\n"
        f"answer = dp.query('SELECT sex, COUNT(*) AS n FROM \"{DATASET}\" GROUP BY sex', epsilon=0.5)\n"
        "print('spent', answer.epsilon_spent, sorted(r[0] for r in answer.rows))")
    assert "spent 0.5 ['F', 'M']" in result.stdout, result.text
    after = _spent(nb_world)
    key = (nb_world.contracts["dp_only"], DATASET)
    assert after[key] == pytest.approx(before.get(key, 0.0) + 0.5)


# -- egress on every message ------------------------------------------------------------------------


def test_raw_rows_never_reach_the_client_of_an_aggregate_kernel(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("aggregate")
    printed = kernel.execute(PRINT_ROWS)
    _no_ids(nb_world, printed.text)
    assert "withheld" in printed.stdout and "notebook-unverified" in printed.stdout
    displayed = kernel.execute("df.head(30)")  # execute_result with text/plain and text/html
    _no_ids(nb_world, displayed.text)
    shown = kernel.execute("from IPython.display import display, HTML\ndisplay(HTML(df.head(30).to_html()))")
    _no_ids(nb_world, shown.text)
    failed = kernel.execute("raise ValueError(df.head(30).to_csv())")
    _no_ids(nb_world, failed.text)
    assert failed.reply["content"]["status"] == "error"
    stderr = kernel.execute("import sys; sys.stderr.write(df.head(30).to_json(orient='records'))")
    _no_ids(nb_world, stderr.text)
    expressions = kernel.execute("x = 1", user_expressions={"rows": "df.head(30).to_string()"})
    _no_ids(nb_world, expressions.text)
    # Even an innocent-looking aggregate is the kernel's bytes: only the platform's own output leaves.
    mean = kernel.execute("print(round(df['age'].mean(), 1), len(df) > 100)")
    assert "True" not in mean.stdout and "notebook-unverified" in mean.stdout
    def withheld(e: dict[str, Any]) -> bool:
        return e["details"].get("decision") == "replace" and "notebook-unverified" in e["details"].get("rules", [])

    events = _audited(nb_world, nb_world.session("aggregate")["id"], withheld)
    assert any(withheld(e) for e in events), "withheld outputs are audited with the rule"


def test_inspect_complete_and_history_leak_nothing(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("aggregate")
    kernel.execute(f"import pandas as pd\nrows = pd.read_parquet('/data/{DATASET}.parquet').head(40)")
    inspected = kernel.request("inspect_request", {"code": "rows", "cursor_pos": 4, "detail_level": 0})
    _no_ids(nb_world, inspected.text)
    assert inspected.reply["content"]["status"] == "ok"
    kernel.execute("ids = {p: 1 for p in rows['patient_id']}")
    completed = kernel.request("complete_request", {"code": "ids['", "cursor_pos": 5})
    _no_ids(nb_world, completed.text)
    kernel.execute("print(rows.to_string())")
    history = kernel.request("history_request", {"output": True, "raw": True, "hist_access_type": "tail", "n": 20})
    _no_ids(nb_world, history.text)


def test_the_kernels_own_tables_are_withheld_whatever_their_cells(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("aggregate")
    kernel.execute(f"import pandas as pd\ndf = pd.read_parquet('/data/{DATASET}.parquet')")
    big = kernel.execute("pd.crosstab(df['sex'], df['symptomatic'])")  # every cell large: still the kernel's bytes
    assert "notebook-unverified" in big.text and "<table" not in big.text, big.text
    small = kernel.execute("pd.crosstab(df['sex'], df['stent_type'])")  # women with a dual-layer stent: 6
    assert "notebook-unverified" in small.text and "<table" not in small.text, small.text


def test_a_crosstab_comes_back_recomputed_by_the_platform_in_one_round_trip(nb_world: NotebookWorld) -> None:
    import pandas as pd

    kernel = nb_world.shared_kernel("aggregate")
    # The kernel lies about the numbers in its own representations; only the platform's recomputation shows.
    shown = kernel.execute(show_spec({"index": ["sex"], "columns": ["symptomatic"], "values": None,
                                      "aggfunc": "count", "filters": []}, lie="P-LIE 999999"))
    displays = shown.of_type("display_data")
    assert len(displays) == 1, shown.text
    data = displays[0]["content"]["data"]
    assert set(data) == {"text/plain", "text/html"} and "P-LIE" not in json.dumps(displays)
    frame = pd.read_parquet(nb_world.version_file())
    expected = frame.groupby(["sex", "symptomatic"]).size()
    for count in expected.tolist():
        assert str(count) in data["text/plain"], (count, data["text/plain"])
    outputs = _outputs(nb_world, "aggregate", lambda o: o["path"].startswith("tables/"))
    assert any(o["status"] == "released" for o in outputs), outputs


def test_a_crosstab_with_small_cells_goes_to_review_and_a_bad_spec_is_named(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("aggregate")
    small = kernel.execute(show_spec({"index": ["sex"], "columns": ["stent_type"], "values": None,
                                      "aggfunc": "count", "filters": []}))
    assert "min-cell-count" in small.text and "<table" not in small.text, small.text
    outputs = _outputs(nb_world, "aggregate", lambda o: "stent_type" in o["path"])
    statuses = [o["status"] for o in outputs if "stent_type" in o["path"]]
    assert statuses in (["in_review"], ["blocked"]), f"recorded for the steward, never released: {outputs}"
    bad = kernel.execute(show_spec({"index": ["patient_id"], "columns": [], "values": None, "aggfunc": "count",
                                    "filters": [], "P0000001": 1}))
    assert "table-spec" in bad.text and "P0000001" not in _shown(bad), bad.text


def _shown(result: Any) -> str:
    """What the client received, less the echo of its own code (which it wrote, so may hold anything)."""
    return json.dumps([result.reply, *(m for m in result.iopub if m["msg_type"] != "execute_input")])


def _outputs(world: NotebookWorld, tier: str, wanted: Any) -> list[dict[str, Any]]:
    session = world.session(tier)
    deadline = time.monotonic() + 20
    while True:
        outputs: list[dict[str, Any]] = world.http.get(f"/v1/jobs/{session['id']}/outputs",
                                                       headers=auth(world.steward)).json()
        if any(wanted(o) for o in outputs) or time.monotonic() > deadline:
            return outputs
        time.sleep(0.3)


def test_a_dp_answer_shows_as_the_platform_recorded_it(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("aggregate")
    result = kernel.execute(
        "from sandbox_client import dp\nfrom IPython.display import display\n"
        f"answer = dp.query('SELECT sex, COUNT(*) AS P_ALIAS_0001 FROM \"{DATASET}\" GROUP BY sex', epsilon=0.3, "
        "display=False)\n"
        "display({'application/vnd.sandbox.dp-answer+json': {'answer_id': answer.raw['answer_id']}, "
        "'text/plain': 'P-LIE'}, raw=True)\n"
        "display({'application/vnd.sandbox.dp-answer+json': {'answer_id': 'f' * 32}}, raw=True)")
    displays = result.of_type("display_data")
    assert len(displays) == 2, result.text
    answer = displays[0]["content"]["data"]["text/plain"]
    assert "sex" in answer and "count" in answer and "F" in answer and "M" in answer, answer
    assert "P_ALIAS" not in _shown(result) and "P-LIE" not in _shown(result), "kernel-chosen text is not echoed"
    assert "dp-answer" in displays[1]["content"]["data"]["text/plain"], "an id the platform never issued"


def test_figures_are_held_for_review(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("aggregate")
    shown = kernel.execute(
        f"import io, matplotlib, pandas as pd\ndf = pd.read_parquet('/data/{DATASET}.parquet')\n"
        "matplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
        "from IPython.display import Image, display\n"
        "fig = plt.figure(); plt.hist(df['age']); png = io.BytesIO(); fig.savefig(png, format='png')\n"
        "display(Image(png.getvalue()))")
    assert "image/png" not in shown.text
    assert "notebook-figure" in shown.text
    session = nb_world.session("aggregate")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        outputs = nb_world.http.get(f"/v1/jobs/{session['id']}/outputs", headers=auth(nb_world.steward)).json()
        held = [o for o in outputs if o["path"].startswith("held/") and o["kind"] == "figure"]
        if held:
            break
        time.sleep(0.3)
    assert held and held[0]["status"] == "in_review"


def test_comms_are_refused_both_ways(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("aggregate")
    msg_id = kernel.send("comm_open", {"comm_id": "c1", "target_name": "jupyter.widget", "data": {}})
    notice = kernel.receive(timeout=10)
    assert notice["msg_type"] == "stream" and "refused" in notice["content"]["text"], notice
    assert msg_id
    opened = kernel.execute("from comm import create_comm\nc = create_comm(target_name='leak', data={'x': 1})")
    assert not opened.of_type("comm_open", "comm_msg")


def test_trusted_outputs_are_shown_and_audited(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("trusted")
    result = kernel.execute(PRINT_ROWS)
    assert any(pid in result.stdout for pid in nb_world.patient_ids())
    session_id = nb_world.session("trusted")["id"]
    events = _audited(nb_world, session_id, lambda e: e["details"]["msg_type"] == "stream")
    stream = [e for e in events if e["details"]["msg_type"] == "stream"]
    assert stream, "each output is recorded"
    details = stream[0]["details"]
    assert len(details["sha256"]) == 64 and details["size"] > 0 and details["cell"]
    assert not any(pid in str(events) for pid in nb_world.patient_ids()), "the audit log holds no values"


def test_dp_only_messages_pass_and_are_each_audited(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("dp_only")
    result = kernel.execute("print('mock'); print('rows')")
    assert "mock" in result.stdout
    cell = result.reply["parent_header"]["msg_id"]
    events = _audited(nb_world, nb_world.session("dp_only")["id"], lambda e: e["details"]["cell"] == cell)
    assert sum(e["details"]["cell"] == cell for e in events) >= 2, "both printed outputs are recorded"


def _audited(world: NotebookWorld, session_id: str, wanted: Any) -> list[dict[str, Any]]:
    """The session's notebook.output events, once one matches `wanted` (the log is written in batches)."""
    deadline = time.monotonic() + 10
    while True:
        events = [e for e in world.audit("notebook.output") if e["object_id"] == session_id]
        if any(wanted(e) for e in events) or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def test_an_oversized_output_is_replaced(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("dp_only")
    result = kernel.execute("print('x' * 400_000)")
    assert "x" * 1000 not in result.text
    assert "notebook-output-size" in result.text


# -- contents and exports ---------------------------------------------------------------------------


def test_the_contents_api_serves_code_but_never_data(nb_world: NotebookWorld) -> None:
    session = nb_world.session("aggregate")
    kernel = nb_world.shared_kernel("aggregate")
    headers = {"Authorization": f"token {session['token']}"}
    contents = f"{session['url']}api/contents"
    notebook = {"type": "notebook", "content": {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}}
    assert httpx.put(f"{contents}/analysis.ipynb", headers=headers, json=notebook).status_code in (200, 201)
    assert httpx.get(f"{contents}/analysis.ipynb", headers=headers).status_code == 200
    written = kernel.execute(
        f"import os, shutil, pandas as pd\ndf = pd.read_parquet('/data/{DATASET}.parquet')\n"
        f"df.head(40).to_csv('/output/rows.csv')\n"
        f"open('/output/notes.txt', 'w').write(df.head(40).to_string())\n"
        f"os.symlink('/data/{DATASET}.parquet', '/output/link.py')\n"
        f"shutil.copy('/data/{DATASET}.parquet', '/output/copy.py')\n"
        "open('/output/helper.py', 'w').write('def mean(xs):\\n    return sum(xs) / len(xs)\\n')")
    assert written.reply["content"]["status"] == "ok", written.text
    for name, why in (("rows.csv", "not code"), ("notes.txt", "rows"), ("link.py", "a link"),
                      ("copy.py", "not text"), ("helper.py", "written by the kernel, not saved by the client")):
        response = httpx.get(f"{contents}/{name}", headers=headers)
        assert response.status_code in (403, 404), f"{name} ({why}) was served: {response.status_code}"
        _no_ids(nb_world, response.text)
        raw = httpx.get(f"{session['url']}files/{name}", headers=headers)
        assert raw.status_code in (403, 404), f"{name} was served by /files"
    for path in (f"../../../../../data/{DATASET}.parquet", f"%2Fdata%2F{DATASET}.parquet",
                 "..%2f..%2fsession.json"):
        assert httpx.get(f"{contents}/{path}", headers=headers).status_code in (400, 403, 404)
    # Saving a notebook whose outputs hold rows keeps the rows out.
    tainted = {"type": "notebook", "content": {"cells": [{
        "cell_type": "code", "execution_count": 1, "metadata": {}, "source": "df",
        "outputs": [{"output_type": "stream", "name": "stdout",
                     "text": "\n".join(f"{p},68,F" for p in nb_world.patient_ids()[:40])}]}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}}
    httpx.put(f"{contents}/tainted.ipynb", headers=headers, json=tainted)
    served = httpx.get(f"{contents}/tainted.ipynb", headers=headers)
    assert served.status_code == 200, served.text
    _no_ids(nb_world, served.text)


def test_files_the_kernel_wrote_are_neither_listed_nor_served(nb_world: NotebookWorld) -> None:
    session = nb_world.session("aggregate")
    kernel = nb_world.shared_kernel("aggregate")
    headers = {"Authorization": f"token {session['token']}"}
    contents = f"{session['url']}api/contents"
    notebook = {"type": "notebook", "content": {"cells": [{"cell_type": "code", "execution_count": None,
                                                           "metadata": {}, "source": "1 + 1", "outputs": []}],
                                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}}
    assert httpx.put(f"{contents}/mine.ipynb", headers=headers, json=notebook).status_code in (200, 201)
    pids = nb_world.patient_ids()[:30]
    written = kernel.execute(
        "import json, os\n"
        f"pids = {pids!r}\n"
        "nb = {'cells': [{'cell_type': 'code', 'execution_count': None, 'metadata': {'rows': pids}, 'outputs': [],"
        " 'source': '\\n'.join(pids)}], 'metadata': {'rows': pids}, 'nbformat': 4, 'nbformat_minor': 5}\n"
        "json.dump(nb, open('/output/rows.ipynb', 'w'))\n"
        "open(f'/output/{pids[0]}.py', 'w').write('x = 1')\n"
        "os.makedirs(f'/output/{pids[1]}', exist_ok=True)\n"
        "open(f'/output/{pids[1]}/a.py', 'w').write('x = 1')")
    assert written.reply["content"]["status"] == "ok", written.text
    listing = httpx.get(f"{contents}", headers=headers)
    assert listing.status_code == 200
    listed = {entry["name"] for entry in listing.json()["content"]}
    assert "mine.ipynb" in listed and listed <= {"mine.ipynb", "analysis.ipynb", "tainted.ipynb"}, listed
    _no_ids(nb_world, listing.text)
    for name in ("rows.ipynb", f"{pids[0]}.py", pids[1], f"{pids[1]}/a.py"):
        for url in (f"{contents}/{name}", f"{session['url']}files/{name}"):
            answer = httpx.get(url, headers=headers)
            assert answer.status_code == 404, f"{name}: {answer.status_code}"
            assert "x = 1" not in answer.text and "cells" not in answer.text, answer.text
    # No oracle either: saving over a name the kernel took is a plain creation.
    taken = httpx.put(f"{contents}/{pids[0]}.py", headers=headers, json={"type": "file", "format": "text",
                                                                           "content": "y = 2"})
    assert taken.status_code == 201, taken.text
    assert httpx.get(f"{contents}/{pids[0]}.py", headers=headers).json()["content"] == "y = 2"
    # A client's file the kernel changed afterwards is the kernel's: gone until the client saves it again.
    replaced = kernel.execute("import os, shutil\nshutil.copy('/output/mine.ipynb', '/output/tmp.txt')\n"
                              f"open('/output/tmp.txt', 'a').write(' ' + {pids[2]!r})\n"
                              "os.replace('/output/tmp.txt', '/output/mine.ipynb')")
    assert replaced.reply["content"]["status"] == "ok", replaced.text
    assert httpx.get(f"{contents}/mine.ipynb", headers=headers).status_code == 404
    assert "mine.ipynb" not in httpx.get(f"{contents}", headers=headers).text


@pytest.mark.parametrize("tier", ["aggregate", "trusted"])
def test_the_rest_models_never_carry_the_kernels_state(nb_world: NotebookWorld, tier: str) -> None:
    session = nb_world.session(tier)
    kernel = nb_world.shared_kernel(tier)
    headers = {"Authorization": f"token {session['token']}"}
    created = httpx.post(f"{session['url']}api/sessions", headers=headers, timeout=60, json={
        "path": "x.ipynb", "name": "x.ipynb", "type": "notebook", "kernel": {"id": kernel.id}})
    assert created.status_code == 201, created.text
    pids = nb_world.patient_ids()[:40]
    forged = kernel.execute(
        "k = get_ipython().kernel\n"
        f"for state in ['{','.join(pids)}', 'P0001234', 'IDLE']:\n"
        "    k.session.send(k.iopub_socket, 'status', {'execution_state': state}, parent=k.get_parent('shell'),"
        " ident=k._topic('status'))\n"
        "import time; time.sleep(0.5)")
    assert forged.reply["content"]["status"] == "ok", forged.text
    if tier == "aggregate":
        _no_ids(nb_world, _shown(forged))
        assert "P0001234" not in _shown(forged), "the websocket relays only states the platform knows"
    for path in ("api/kernels", f"api/kernels/{kernel.id}", "api/sessions", f"api/sessions/{created.json()['id']}"):
        answer = httpx.get(f"{session['url']}{path}", headers=headers)
        assert answer.status_code == 200, answer.text
        _no_ids(nb_world, answer.text)
        assert "P0001234" not in answer.text and "IDLE" not in answer.text, f"{path}: {answer.text}"
        models = answer.json() if isinstance(answer.json(), list) else [answer.json()]
        states = {(m.get("kernel") or m)["execution_state"] for m in models}
        assert states == {"unknown"}, f"{path}: {states}"


def test_errors_show_the_type_and_the_buyers_line_without_values(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("aggregate")
    kernel.execute(f"import pandas as pd\ndf = pd.read_parquet('/data/{DATASET}.parquet')")
    failed = kernel.execute("rows = df.head(20)\nraise ValueError(rows.to_csv())")
    errors = failed.of_type("error")
    assert errors and errors[0]["content"]["ename"] == "ValueError", failed.text
    assert "line 2: raise ValueError(rows.to_csv())" in errors[0]["content"]["traceback"][0]
    _no_ids(nb_world, failed.text)
    named = kernel.execute("raise type(df['patient_id'].iloc[0] + 'Error', (Exception,), {})('x')")
    assert [e["content"]["ename"] for e in named.of_type("error")] == ["Exception"], named.text
    _no_ids(nb_world, _shown(named))  # a class named after a patient shows as Exception
    disguised = kernel.execute(
        "from IPython.display import display, Markdown, Latex, JSON, HTML\n"
        "import base64\n"
        "display(Markdown('| ' + df.head(20).to_string().replace(chr(10), ' |' + chr(10) + '| ')))\n"
        "display(Latex('$$' + df.head(20).to_latex() + '$$'))\n"
        "display(JSON(df.head(20).to_dict('records')))\n"
        "display(HTML('<img src=\"data:image/png;base64,' + base64.b64encode(df.head(20).to_csv().encode()).decode()"
        " + '\">'))\n"
        "print(df.head(20).to_string().lower().replace(' ', ';'))")
    _no_ids(nb_world, disguised.text)
    _no_ids(nb_world, disguised.text.lower())
    assert disguised.of_type("display_data") and "notebook-unverified" in disguised.text


def test_files_leave_only_through_an_export_that_is_reviewed(nb_world: NotebookWorld) -> None:
    session = nb_world.session("aggregate")
    kernel = nb_world.shared_kernel("aggregate")
    kernel.execute("import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
                   "plt.figure(); plt.plot([1, 2, 3]); plt.savefig('/output/trend.png')")
    exported = nb_world.http.post(f"/v1/notebooks/{session['id']}/exports", headers=auth(nb_world.buyer),
                                  json={"path": "trend.png"})
    assert exported.status_code == 201, exported.text
    assert exported.json()["status"] in ("in_review", "withheld"), "the buyer learns nothing more of it"
    assert _outputs(nb_world, "aggregate", lambda o: o["path"] == "exports/trend.png" and o["status"] == "in_review")
    for bad in ("../session.json", "/etc/passwd", "nope.png"):
        refused = nb_world.http.post(f"/v1/notebooks/{session['id']}/exports", headers=auth(nb_world.buyer),
                                     json={"path": bad})
        assert refused.status_code in (404, 422), refused.text
    download = nb_world.http.get(f"/v1/jobs/{session['id']}/outputs/exports/trend.png", headers=auth(nb_world.buyer))
    assert download.status_code in (403, 404), "nothing leaves before review"
    reviewer = nb_world.instance.issue_token(sub="reviewer", org="hospital", role=Role.STEWARD, ttl_s=600).token
    queue = nb_world.http.get("/v1/reviews", headers=auth(reviewer)).json()
    assert session["id"] in [job["id"] for job in queue]
    decided = nb_world.http.post(f"/v1/reviews/{session['id']}/decisions", headers=auth(reviewer),
                                 json={"release": ["exports/trend.png"], "comment": "a trend line"})
    assert decided.status_code == 200, decided.text
    download = nb_world.http.get(f"/v1/jobs/{session['id']}/outputs/exports/trend.png", headers=auth(nb_world.buyer))
    assert download.status_code == 200 and download.content.startswith(b"\x89PNG")


# -- limits, culling, usage, crashes ----------------------------------------------------------------


def _limited_contract(world: NotebookWorld) -> str:
    """A contract under a policy that allows one kernel, culled after two idle seconds."""
    import yaml

    body = yaml.safe_load((world.instance.settings.policies_dir / "default.yaml").read_text())
    body["name"] = "notebook-limits"
    body["notebooks"] = {**body["notebooks"], "max_kernels_per_contract": 1, "idle_timeout_s": 2}
    proposed = world.http.post("/v1/policies", headers=auth(world.steward), json=body)
    assert proposed.status_code == 201, proposed.text
    second = world.instance.issue_token(sub="steward-2", org="hospital", role=Role.STEWARD, ttl_s=600).token
    version = proposed.json()["version"]
    approved = world.http.post(f"/v1/policies/notebook-limits/versions/{version}/approve", headers=auth(second))
    assert approved.status_code == 200, approved.text
    created = world.http.post("/v1/contracts", headers=auth(world.steward), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "aggregate", "kinds": ["notebook"],
        "purpose": "limits", "valid_until": "2099-01-01", "epsilon": 1.0, "policy": "notebook-limits",
        "quotas": {"concurrent_jobs": 1, "cpu_hours": 1}})
    assert created.status_code == 201, created.text
    contract: str = created.json()["id"]
    world.contracts["limited"] = contract
    return contract


def test_kernels_per_contract_are_limited_and_idle_ones_culled(nb_world: NotebookWorld) -> None:
    _limited_contract(nb_world)
    session = nb_world.start("limited")
    headers = {"Authorization": f"token {session['token']}"}
    first = httpx.post(f"{session['url']}api/kernels", headers=headers, json={"name": "sandbox"}, timeout=60)
    assert first.status_code == 201, first.text
    second = httpx.post(f"{session['url']}api/kernels", headers=headers, json={"name": "sandbox"}, timeout=60)
    assert second.status_code == 403 and "limit" in second.text, second.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not httpx.get(f"{session['url']}api/kernels", headers=headers).json():
            break
        time.sleep(0.5)
    assert httpx.get(f"{session['url']}api/kernels", headers=headers).json() == [], "the idle kernel was culled"
    label = f"org.sandbox.notebook={session['id']}"
    assert not _containers(label), "a culled kernel's container is removed"
    again = httpx.post(f"{session['url']}api/kernels", headers=headers, json={"name": "sandbox"}, timeout=60)
    assert again.status_code == 201, "after the cull there is room for a kernel again"


def _containers(label: str) -> list[str]:
    from jobworld import docker_client

    return [c.name for c in docker_client().containers.list(all=True, filters={"label": label})]


def test_a_killed_server_is_replaced_and_its_kernels_removed(nb_world: NotebookWorld) -> None:
    session = nb_world.start("trusted")
    kernel = nb_world.kernel(session)
    assert "2" in kernel.execute("print(1 + 1)").stdout
    label = f"org.sandbox.notebook={session['id']}"
    assert _containers(label), "the session's kernels run"
    running = nb_world.server(session["id"])
    nb_world.kernel_by_tier.pop("trusted", None)  # its websocket dies with the server
    running.process.kill()
    running.process.wait(timeout=10)
    headers = {"Authorization": f"token {session['token']}"}
    status = httpx.get(f"{session['url']}api/kernels", headers=headers, timeout=60)
    assert status.status_code == 200 and status.json() == [], "a new server, with none of the old kernels"
    assert not _containers(label), "the dead server's kernel container is removed"
    replacement = nb_world.kernel(session)
    assert "3" in replacement.execute("print(1 + 2)").stdout


def test_stopping_a_session_meters_usage_and_removes_everything(nb_world: NotebookWorld) -> None:
    session = nb_world.start("dp_only")
    kernel = nb_world.kernel(session)
    kernel.execute("sum(i * i for i in range(3_000_000))")
    workspace = nb_world.workspace(session["id"])
    stopped = nb_world.http.delete(f"/v1/notebooks/{session['id']}", headers=auth(nb_world.buyer))
    assert stopped.status_code == 200, stopped.text
    nb_world.sessions.remove(session["id"])
    nb_world.by_tier.pop("dp_only", None)
    nb_world.kernel_by_tier.pop("dp_only", None)
    assert stopped.json()["state"] == "done"
    assert not _containers(f"org.sandbox.notebook={session['id']}")
    assert not workspace.exists()
    job = nb_world.http.get(f"/v1/jobs/{session['id']}", headers=auth(nb_world.buyer)).json()
    assert job["kind"] == "notebook" and job["usage"]["kernels"] >= 1
    assert job["usage"]["cpu_seconds"] > 0.1 and job["usage"]["wall_seconds"] > 0
    usage = {u["contract"]: u for u in nb_world.http.get("/v1/usage", headers=auth(nb_world.buyer)).json()}
    assert usage[nb_world.contracts["dp_only"]]["cpu_hours"] > 0, "kernel CPU counts against the contract"
    refused = httpx.get(f"{session['url']}api/status", headers={"Authorization": f"token {session['token']}"})
    assert refused.status_code == 409, "a stopped session's token opens nothing"


def test_an_input_prompt_carries_no_rows(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("aggregate")
    kernel.execute(f"import pandas as pd\ndf = pd.read_parquet('/data/{DATASET}.parquet')")
    msg_id = kernel.send("execute_request", {"code": "answer = input(df.head(20).to_string())", "silent": False,
                                             "store_history": False, "user_expressions": {}, "allow_stdin": True})
    deadline = time.monotonic() + 30
    prompt = None
    while prompt is None and time.monotonic() < deadline:
        message = kernel.receive(timeout=30)
        if message["channel"] == "stdin" and message["parent_header"].get("msg_id") == msg_id:
            prompt = message
    assert prompt is not None and prompt["msg_type"] == "input_request"
    _no_ids(nb_world, json.dumps(prompt))
    assert "notebook-unverified" in prompt["content"]["prompt"]
    kernel.send("input_reply", {"value": "ok"}, channel="stdin")
    while True:  # the kernel goes on once it has its answer
        message = kernel.receive(timeout=30)
        if message["msg_type"] == "execute_reply" and message["parent_header"].get("msg_id") == msg_id:
            assert message["content"]["status"] == "ok"
            break


def test_a_flood_of_outputs_is_rate_limited(nb_world: NotebookWorld) -> None:
    kernel = nb_world.shared_kernel("trusted")
    flood = kernel.execute("from IPython.display import display\nfor i in range(1500):\n    display(i)", timeout=180)
    shown = len(flood.of_type("display_data"))
    assert shown < 1500, "every message of the flood was relayed"
    assert "rate exceeded" in flood.text


def test_jupyterlabs_binary_protocol_is_filtered_too(nb_world: NotebookWorld) -> None:
    kernel = nb_world.kernel(nb_world.session("aggregate"), v1=True)
    printed = kernel.execute(PRINT_ROWS)
    _no_ids(nb_world, printed.text)
    assert "notebook-unverified" in printed.stdout
    table = kernel.execute(show_spec({"index": ["sex"], "columns": [], "values": None, "aggfunc": "count",
                                      "filters": []}))
    shown = table.of_type("display_data")
    assert shown and "sex" in shown[0]["content"]["data"]["text/plain"], table.text
