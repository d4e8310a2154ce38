"""Notebooks executed by nbclient against the running service, through jupyter_server's own remote-kernel
client (the one it uses for kernel gateways): what JupyterLab or VS Code do when given the URL and token."""

from __future__ import annotations

from typing import Any

import nbformat
import pytest
from helpers import auth
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook
from nbworld import DATASET, NotebookWorld, show_spec

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# The Jupyter protocol is not the store's subject (test_notebooks.py runs on both): SQLite only.
SQLITE_WORLD = pytest.mark.parametrize("nb_world", ["sqlite"], indirect=True, scope="module")


def run_notebook(session: dict[str, Any], cells: list[str], monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    from jupyter_server.gateway import managers
    from jupyter_server.gateway.gateway_client import GatewayClient
    from jupyter_server.gateway.managers import GatewayKernelManager

    # The gateway client sends its token on REST calls but opens the kernel's websocket without it (it
    # expects a gateway on a trusted network); the service requires it there too, as JupyterLab sends it.
    connect = managers.websocket.create_connection
    monkeypatch.setattr(managers.websocket, "create_connection", lambda url, **kw: connect(
        url, header=[f"Authorization: token {session['token']}"], **kw))

    gateway = GatewayClient.instance()
    gateway.url = session["url"].rstrip("/")
    gateway.ws_url = gateway.url.replace("http://", "ws://")
    gateway.auth_token = session["token"]
    gateway.request_timeout = 60.0
    gateway.init_connection_args()
    notebook = new_notebook(cells=[new_code_cell(source) for source in cells])
    class RemoteKernelManager(GatewayKernelManager):  # type: ignore[misc]
        async def _async_is_alive(self) -> bool:
            # The stock check polls a local process, which a remote kernel does not have.
            return bool(self.has_kernel)

    client = NotebookClient(notebook, km=RemoteKernelManager(kernel_name="sandbox"), kernel_name="sandbox",
                            timeout=120, allow_errors=True)
    client.execute(kernel_name="sandbox")
    return notebook


@SQLITE_WORLD
def test_nbclient_explores_the_mock_and_runs_a_dp_query(nb_world: NotebookWorld,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    session = nb_world.session("dp_only")
    notebook = run_notebook(session, [
        f"import pandas as pd\nmock = pd.read_parquet('/data/{DATASET}.parquet')\nprint(len(mock) > 0)",
        "from sandbox_client import dp\n"
        f"answer = dp.query('SELECT COUNT(*) AS n FROM \"{DATASET}\"', epsilon=0.2)\n"
        "print('charged', answer.epsilon_spent)",
        "import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
        "plt.hist(mock['age']); plt.savefig('/output/ages.png')",
    ], monkeypatch)
    outputs = [output for cell in notebook.cells for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs)
    assert "True" in text and "charged 0.2" in text, outputs
    exported = nb_world.http.post(f"/v1/notebooks/{session['id']}/exports", headers=auth(nb_world.buyer),
                                  json={"path": "ages.png"})
    assert exported.status_code == 201 and exported.json()["status"] in ("in_review", "withheld"), exported.text


@SQLITE_WORLD
def test_nbclient_on_real_rows_gets_aggregates_but_no_rows(nb_world: NotebookWorld,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    session = nb_world.session("aggregate")
    notebook = run_notebook(session, [
        f"import pandas as pd\ndf = pd.read_parquet('/data/{DATASET}.parquet')",
        "df.head(20)",
        "print(df.sample(20).to_csv())",
        "df.groupby('sex').size()",
        show_spec({"index": ["sex"], "columns": [], "values": None, "aggfunc": "count", "filters": []}),
    ], monkeypatch)
    served = nbformat.writes(notebook)
    leaked = [pid for pid in nb_world.patient_ids() if pid in served]
    assert not leaked, leaked[:3]
    assert "notebook-unverified" in notebook.cells[3].outputs[0]["data"]["text/plain"], "the kernel's own bytes"
    last = notebook.cells[4].outputs[0]["data"]["text/plain"]
    assert "F" in last and "M" in last and "withheld" not in last, "the platform's recomputed table"
