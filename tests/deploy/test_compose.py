"""docker-compose.yml from nothing: PostgreSQL, the API and the worker come up from the local images, the
demo registry is registered through the documented bootstrap, and a buyer runs a job through to a
steward's review, a DP query and a notebook cell against it.

Each run has its own project name, root folder under /var/tmp, loopback port and database password, and
takes everything down again (`down -v`, the worker's sibling containers, the quota mounts, the folder),
whether it passed or not. Run alone: `pytest -m deploy tests/deploy/test_compose.py`.
"""

from __future__ import annotations

import io
import os
import secrets
import socket
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from nbworld import JupyterKernel

from sandbox.auth.keys import key_id, load_public_key
from sandbox.client import SandboxClient

pytestmark = [pytest.mark.deploy, pytest.mark.docker, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DATASET = "carotid-stenting"
HOSPITAL = "xuanwu-hospital"  # the demo's data holder (sandbox/demo_setup.py)

ANALYSIS = """\
from sandbox_client import tables
df = tables.read("/data/carotid-stenting.parquet")
tables.crosstab(df, index="embolic_protection", columns="stroke_death_30d", path="/output/outcomes.csv")
df.groupby("embolic_protection")["length_of_stay"].median().to_csv("/output/by_protection.csv")
print("procedures:", len(df))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, **options)


@dataclass
class Deployment:
    """One compose project: its folders, its environment and the commands that drive it."""

    compose: list[str]
    root: Path
    project: str = field(default_factory=lambda: f"sbxtest{uuid.uuid4().hex[:10]}")
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def home(self) -> Path:
        return self.root / "home"

    def environment(self) -> dict[str, str]:
        return {**os.environ, "SANDBOX_COMPOSE_ROOT": str(self.root), "SANDBOX_PORT": str(self.port),
                "SANDBOX_PUBLIC_URL": self.url, "POSTGRES_PASSWORD": self.password,
                "COMPOSE_PROJECT_NAME": self.project}

    def __call__(self, *arguments: str, timeout: float = 300, check: bool = True) -> str:
        result = run([*self.compose, "--file", str(COMPOSE_FILE), "--project-name", self.project, *arguments],
                     env=self.environment(), timeout=timeout, cwd=REPO_ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(arguments)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{self.logs()}")
        return result.stdout

    def logs(self) -> str:
        result = run([*self.compose, "--file", str(COMPOSE_FILE), "--project-name", self.project, "logs",
                      "--no-color", "--tail=60"], env=self.environment(), timeout=60, cwd=REPO_ROOT)
        return f"--- logs of {self.project} ---\n{result.stdout[-12000:]}"

    def sandbox(self, *arguments: str) -> str:
        """`sandbox ...` in the running API container, as an operator runs it."""
        return self("exec", "-T", "api", "sandbox", *arguments, timeout=180)

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"the API did not answer on {self.url} within {timeout:.0f}s\n{self.logs()}")

    def instance_id(self) -> str | None:
        key = self.home / "keys" / "signing-ed25519.pub.pem"
        return key_id(load_public_key(key)) if key.is_file() else None


def make_shared_mount(root: Path) -> None:
    """The worker's home mount is `rshared`, which needs a shared mount on the host (systemd's / is one)."""
    for command in (["mount", "--bind", str(root), str(root)], ["mount", "--make-rshared", str(root)]):
        result = run(command)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"


def unmount_below(root: Path) -> None:
    """Unmount the quota file systems the worker left (and the root's own bind mount), deepest first."""
    prefix = str(root)
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in sorted({m for m in mounts if m == prefix or m.startswith(prefix + "/")}, key=len, reverse=True):
        run(["umount", "--lazy", target])


def tear_down(deployment: Deployment, engine: Any) -> list[str]:
    """Everything the deployment made goes, whatever state it is in; returns what could not be removed."""
    problems = []
    instance = deployment.instance_id()
    result = run([*deployment.compose, "--file", str(COMPOSE_FILE), "--project-name", deployment.project, "down",
                  "--volumes", "--remove-orphans", "--timeout", "10"], env=deployment.environment(), timeout=180)
    if result.returncode != 0:
        problems.append(f"down: {result.stderr[-1000:]}")
    # Job and kernel containers are the host engine's, started by the worker: not the project's.
    if instance is not None:
        for container in engine.containers.list(all=True, filters={"label": f"org.sandbox.instance={instance}"}):
            container.remove(force=True, v=True)
    unmount_below(deployment.root)
    removed = run(["rm", "-rf", "--one-file-system", str(deployment.root)])
    if removed.returncode != 0 or deployment.root.exists():
        problems.append(f"could not remove {deployment.root}: {removed.stderr}")
    return problems


@dataclass
class Running:
    deployment: Deployment
    buyer: SandboxClient
    steward: SandboxClient
    contract: str


@pytest.fixture(scope="module")
def deployment(engine: Any, built_images: dict[str, str], compose_command: list[str]) -> Iterator[Running]:
    root = Path(tempfile.mkdtemp(prefix="sbx-compose-", dir="/var/tmp"))
    deployment = Deployment(compose=compose_command, root=root)
    try:
        (root / "home").mkdir()
        (root / "run").mkdir()
        make_shared_mount(root)
        deployment("up", "--detach", timeout=600)
        deployment.wait_healthy()
        # The documented bootstrap: the demo registry, a buyer contract and tokens in <home>/demo.env.
        deployment.sandbox("demo", "--no-serve")
        tokens = dict(line.removeprefix("export ").split("=", 1)
                      for line in (deployment.home / "demo.env").read_text().splitlines())
        assert tokens["SANDBOX_URL"] == deployment.url, "demo.env does not name the published URL"
        # And a token issued by the operator, as `sandbox token issue` prints it.
        steward_token = deployment.sandbox("token", "issue", "--sub", "dr-wu", "--org", HOSPITAL,
                                           "--role", "steward").strip()
        buyer = SandboxClient(deployment.url, tokens["BUYER_TOKEN"])
        steward = SandboxClient(deployment.url, steward_token)
        contracts = buyer.list_contracts()
        assert len(contracts) == 1, contracts
        yield Running(deployment, buyer, steward, contracts[0]["id"])
        buyer.close()
        steward.close()
        verified = deployment.sandbox("audit", "verify")  # exit 0: the chain is intact
        assert "audit chain intact" in verified, verified
    except BaseException:
        print(deployment.logs())
        raise
    finally:
        problems = tear_down(deployment, engine)
        assert not problems, problems


def bundle(tmp_path: Path, files: dict[str, str]) -> Path:
    path = tmp_path / "code.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def wait_for_state(client: SandboxClient, job_id: str, states: set[str], timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = client.job(job_id)
    while job["state"] not in states and time.monotonic() < deadline:
        job = client.job(job_id, wait_s=min(20.0, max(1.0, deadline - time.monotonic())), since=job["state"])
    assert job["state"] in states, f"job {job_id} is {job['state']} ({job.get('reason')}), not {sorted(states)}"
    return job


def test_a_job_runs_in_a_sibling_container_through_to_review(deployment: Running, tmp_path: Path) -> None:
    buyer, steward = deployment.buyer, deployment.steward
    spec = {"contract": deployment.contract, "dataset": DATASET, "image": "analysis",
            "command": ["python3", "main.py"], "resources": {"cpus": 1, "memory_mb": 1024, "timeout_s": 300}}
    submitted = buyer.submit_job(spec, bundle(tmp_path, {"main.py": ANALYSIS}))
    job = wait_for_state(buyer, submitted["id"], {"in_review", "done", "failed"})
    assert job["state"] == "in_review", f"the job did not reach review: {job}"

    outputs = {o.get("path"): o for o in buyer.job_outputs(job["id"])}
    table = "tables/count-by-embolic_protection-x-stroke_death_30d.csv"
    assert outputs[table]["status"] == "released", f"the platform's verified table did not leave: {outputs}"
    assert b"distal-filter" in buyer.output_bytes(job["id"], table)

    waiting = {entry["id"] for entry in steward.reviews()}
    assert job["id"] in waiting, "the job's own files are not in the steward's review queue"
    steward.decide_review(job["id"], release=["by_protection.csv", "logs/stdout.txt"], reject=[],
                          comment="aggregate")
    done = wait_for_state(buyer, job["id"], {"done"}, timeout=60)
    assert done["state"] == "done"
    assert b"procedures: 2550" in buyer.output_bytes(job["id"], "logs/stdout.txt")
    assert b"length_of_stay" in buyer.output_bytes(job["id"], "by_protection.csv")


def test_a_dp_query_is_answered_and_charged(deployment: Running) -> None:
    sql = f'SELECT embolic_protection, COUNT(*) AS n FROM "{DATASET}" GROUP BY embolic_protection'
    answer = deployment.buyer.query(deployment.contract, DATASET, sql, epsilon=0.2)
    assert answer["columns"][:2] == ["embolic_protection", "n"], answer
    assert {row[0] for row in answer["rows"]} <= {"distal-filter", "proximal-occlusion", "none"}
    assert answer["epsilon_spent"] == pytest.approx(0.2)


def test_a_notebook_cell_runs_in_a_kernel_beside_the_data(deployment: Running) -> None:
    session = deployment.buyer.start_notebook(deployment.contract, DATASET)
    assert session["url"].startswith(f"{deployment.deployment.url}/notebooks/"), session
    kernel = JupyterKernel(session["url"], session["token"])
    try:
        result = kernel.execute("print(6 * 7)", timeout=120)
        assert result.reply["content"]["status"] == "ok", result.text
        assert result.iopub, "the cell produced nothing at all"
    finally:
        kernel.close()
        deployment.buyer.stop_notebook(session["id"])
