"""The notebook tour as a researcher runs it: `sandbox notebook start`, a Jupyter client on the printed URL
and token, aggregates in, rows out, a figure exported for review, the session stopped; and the processes
behind it: the worker (embedded in `sandbox serve`, or `sandbox worker` beside an API without Docker, as
docker-compose runs them) hosts the servers and kernels, and a killed one takes its kernels with it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from cli.server import Server
from helpers import patient_ids
from nbworld import JupyterKernel, show_spec

from sandbox.demo import CARD, write_registry

pytestmark = [pytest.mark.docker, pytest.mark.slow]


# The store is not what this tour tests (the API and worker tests run on both stores): SQLite only, to keep
# the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_start_connect_explore_export_and_stop(server: Server, tmp_path: Path, analysis_image: str) -> None:
    steward = server.token("steward", "xuanwu", "dr-li")
    reviewer = server.token("steward", "xuanwu", "dr-wang")
    researcher = server.token("buyer", "uni-lab", "bob")
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({k: v for k, v in CARD.items() if k != "name"}))
    server.cli("dataset", "create", "carotid-stenting", "--card", str(card), token=steward)
    registry = write_registry(tmp_path / "r.parquet", procedures=600)
    server.cli("dataset", "add-version", "carotid-stenting", str(registry), token=steward)
    contract = json.loads(server.cli(
        "contract", "create", "--buyer-org", "uni-lab", "--dataset", "carotid-stenting", "--tier", "aggregate",
        "--kinds", "notebook", "--epsilon", "1", "--valid-until", "2099-12-31", "--json", token=steward).stdout)["id"]

    started = server.cli("notebook", "start", "--contract", contract, "--dataset", "carotid-stenting",
                         token=researcher).stdout
    url = re.search(r"url:\s+(\S+)", started)
    token = re.search(r"token:\s+(\S+)", started)
    assert url and token, started
    kernel = JupyterKernel(url.group(1), token.group(1))
    try:
        kernel.execute("import pandas as pd\ndf = pd.read_parquet('/data/carotid-stenting.parquet')")
        counts = kernel.execute(show_spec({"index": ["sex"], "columns": [], "values": None, "aggfunc": "count",
                                           "filters": []}))
        table = counts.of_type("display_data")[0]["content"]["data"]["text/plain"]
        assert "F" in table and "M" in table, "the platform's recomputed table comes back"
        rows = kernel.execute("print(df.head(10).to_string())")
        assert "withheld" in rows.stdout and not any(pid in rows.text for pid in patient_ids(registry))
        kernel.execute("import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
                       "plt.hist(df['age']); plt.savefig('/output/ages.png')")
    finally:
        kernel.close()
    session = re.search(r"notebook (j-[0-9a-f]+)", started)
    assert session, started
    exported = server.cli("notebook", "export", session.group(1), "ages.png", token=researcher).stdout
    assert "exports/ages.png" in exported or "withheld" in exported, exported
    assert session.group(1) in server.cli("review", "list", token=reviewer).stdout
    listed = json.loads(server.cli("notebook", "list", "--json", token=researcher).stdout)
    assert [s["state"] for s in listed if s["id"] == session.group(1)] == ["running"]
    stopped = server.cli("notebook", "stop", session.group(1), token=researcher).stdout
    assert "in_review" in stopped, "the export still waits for its review"




# The store is not what this tour tests (the API and worker tests run on both stores): SQLite only, to keep
# the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_service_killed_outright_takes_its_kernels_with_it(server: Server, tmp_path: Path,
                                                            analysis_image: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    import docker
    import httpx
    from cli.server import free_port, stop, wait_healthy

    researcher, contract = _trusted_notebook_contract(server, tmp_path)
    session = json.loads(server.cli("notebook", "start", "--contract", contract, "--dataset", "carotid-stenting",
                                    "--json", token=researcher).stdout)
    kernel = JupyterKernel(session["url"], session["token"])
    kernel.execute("x = 41")
    kernel.close()
    client = docker.from_env()
    label = {"label": f"org.sandbox.notebook={session['id']}"}
    assert client.containers.list(all=True, filters=label)

    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    deadline = time.monotonic() + 30
    while client.containers.list(all=True, filters=label) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not client.containers.list(all=True, filters=label), "the orphaned server shut its kernels down"

    port = free_port()
    restarted = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "serve", "--port", str(port)], env=server.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", restarted)
        url = session["url"].replace(server.url, f"http://127.0.0.1:{port}")
        headers = {"Authorization": f"token {session['token']}"}
        kernels = httpx.get(f"{url}api/kernels", headers=headers, timeout=60)
        assert kernels.status_code == 200 and kernels.json() == [], "the session lives on; its old kernels do not"
        again = JupyterKernel(url, session["token"])
        assert "NameError" in again.execute("print(x)").text
        again.close()
        ended = httpx.delete(f"http://127.0.0.1:{port}/v1/notebooks/{session['id']}",
                             headers={"Authorization": f"Bearer {researcher}"}, timeout=60)
        assert ended.status_code == 200, ended.text
    finally:
        stop(restarted)
    assert not client.containers.list(all=True, filters=label), "a stopped service leaves no kernel behind"


# An API alone beside a worker process is the production layout, which runs on PostgreSQL (and elects its
# scheduler there): that store only, to keep the suite's time.
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_api_alone_proxies_to_a_separate_worker_that_may_die_and_come_back(server: Server, tmp_path: Path,
                                                                             analysis_image: str) -> None:
    """As docker-compose runs it: `sandbox serve` without its embedded worker, and `sandbox worker` apart."""
    import signal
    import subprocess
    import sys
    import time

    import docker
    import httpx
    from cli.server import free_port, stop, wait_healthy

    researcher, contract = _trusted_notebook_contract(server, tmp_path)
    stop(server.process)  # its embedded worker published the images; from here on the API has no worker inside

    env = {**server.env, "SANDBOX_EMBEDDED_WORKER": "false"}
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "serve", "--port", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    worker_log = (tmp_path / "worker.log").open("w")

    def start_worker() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "sandbox.cli", "worker"], env=env, stdout=worker_log,
                                stderr=subprocess.STDOUT, text=True)

    worker = start_worker()
    client = docker.from_env()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", api)
        alone = Server(url=f"http://127.0.0.1:{port}", home=server.home, env=env, process=api)
        session = json.loads(alone.cli("notebook", "start", "--contract", contract, "--dataset", "carotid-stenting",
                                       "--json", token=researcher).stdout)
        kernel = JupyterKernel(session["url"], session["token"])
        kernel.execute("x = 41\nopen('/output/notes.txt', 'w').write('a note')")
        kernel.close()
        exported = alone.cli("notebook", "export", session["id"], "notes.txt", token=researcher).stdout
        assert "exports/notes.txt" in exported or "withheld" in exported, exported
        label = {"label": f"org.sandbox.notebook={session['id']}"}
        assert client.containers.list(all=True, filters=label), "the worker runs the kernel"

        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        deadline = time.monotonic() + 30
        while client.containers.list(all=True, filters=label) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not client.containers.list(all=True, filters=label), "the dead worker's server shut its kernels down"

        worker = start_worker()
        headers = {"Authorization": f"token {session['token']}"}
        kernels = httpx.get(f"{session['url']}api/kernels", headers=headers, timeout=60)
        assert kernels.status_code == 200 and kernels.json() == [], "the new worker serves the session again"
        again = JupyterKernel(session["url"], session["token"])
        assert "NameError" in again.execute("print(x)").text
        again.close()
        stopped = alone.cli("notebook", "stop", session["id"], token=researcher).stdout
        assert "in_review" in stopped, "the export still waits for its review"
        assert not client.containers.list(all=True, filters=label), "the worker removed the session's kernels"
    finally:
        for process in (worker, api):
            if process.poll() is None:
                stop(process)
        worker_log.close()


def _trusted_notebook_contract(server: Server, tmp_path: Path) -> tuple[str, str]:
    """The registry on the server and a trusted notebook contract for uni-lab: (researcher's token, contract)."""
    steward = server.token("steward", "xuanwu", "dr-li")
    researcher = server.token("buyer", "uni-lab", "bob")
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({k: v for k, v in CARD.items() if k != "name"}))
    server.cli("dataset", "create", "carotid-stenting", "--card", str(card), token=steward)
    server.cli("dataset", "add-version", "carotid-stenting", str(write_registry(tmp_path / "r.parquet",
                                                                                 procedures=300)), token=steward)
    contract: str = json.loads(server.cli(
        "contract", "create", "--buyer-org", "uni-lab", "--dataset", "carotid-stenting", "--tier", "trusted",
        "--kinds", "notebook", "--epsilon", "1", "--valid-until", "2099-12-31", "--json", token=steward).stdout)["id"]
    return researcher, contract
