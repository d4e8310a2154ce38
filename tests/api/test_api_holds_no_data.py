"""The API process holds no data (issue 12): it checks, forwards and records; the worker reads the data.

DP queries, mock publication and version uploads reach the data only through the worker's local service
(`sandbox.worker_socket`) on its Unix socket. Here that service runs in the test process, as `sandbox
worker` runs it, and the API runs alone in a child process that records every file it opens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from sqlalchemy import func, select

from sandbox.catalog.service import get_dataset
from sandbox.config import Settings
from sandbox.dp import queries
from sandbox.dp.plan import DatasetPrivacy, plan_query
from sandbox.errors import Invalid, SandboxError, TooManyRequests
from sandbox.instance import Instance
from sandbox.local_http import LocalHttpServer, RemoteProblem, call, worker_socket
from sandbox.store.models import AuditEvent, BudgetLedger, DatasetBudget
from sandbox.worker_socket import principal_body

DATASET = "carotid-stenting"
SQL = 'SELECT sex, COUNT(*) AS n FROM "carotid-stenting" GROUP BY sex'
RECORDED_API = Path(__file__).with_name("recorded_api.py")
REPO = Path(__file__).resolve().parents[2]


def _contract(api: Any, steward: str, epsilon: float = 1.0) -> str:
    response = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "dp_only", "kinds": ["query"], "purpose": "no data",
        "valid_until": "2099-01-01", "epsilon": epsilon, "policy": "dp-only"})
    assert response.status_code == 201, response.text
    identifier: str = response.json()["id"]
    return identifier


def _ask(api: Any, buyer: str, contract: str, sql: str = SQL, epsilon: float = 0.2) -> Any:
    return api.post("/v1/queries", headers=auth(buyer),
                    json={"contract": contract, "dataset": DATASET, "sql": sql, "epsilon": epsilon})


def _spent(instance: Instance) -> dict[str, tuple[int, int]]:
    with instance.sessions() as session:
        rows = session.execute(select(BudgetLedger)).scalars()
        return {r.contract_id: (r.epsilon_spent_units, r.epsilon_reserved_units) for r in rows}


def _mock_spent(instance: Instance) -> float:
    with instance.sessions() as session:
        return float(session.execute(select(DatasetBudget.mock_epsilon)
                                     .where(DatasetBudget.dataset == DATASET)).scalar_one())


def _events(instance: Instance, action: str) -> int:
    with instance.sessions() as session:
        return int(session.execute(select(func.count()).select_from(AuditEvent)
                                   .where(AuditEvent.action == action)).scalar_one())


# --- (a) the API process opens no dataset file ---------------------------------------------------------------

@dataclass
class RecordedApi:
    http: httpx.Client
    process: subprocess.Popen[str]
    record: Path

    def stop(self) -> list[str]:
        """Stop the API process; what it opened, as it wrote it down when it stopped."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=60)
        assert self.record.exists(), f"the API process left no record:\n{output}"
        opened: list[str] = json.loads(self.record.read_text())
        return opened


@pytest.fixture
def recorded_api(settings: Settings, instance: Instance, worker_service: LocalHttpServer,
                 tmp_path: Path) -> Iterator[RecordedApi]:
    """The API alone in a child process serving a Unix socket, beside this process's worker service."""
    socket_path = Path(f"/tmp/api-{os.getpid()}-{time.monotonic_ns() % 10**9}.sock")  # short enough to bind
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    env.update({"SANDBOX_HOME": str(settings.home), "SANDBOX_DP_SOCKET_ROOT": str(settings.dp_socket_root),
                "SANDBOX_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)})
    if settings.database_url:
        env["SANDBOX_DATABASE_URL"] = settings.database_url
    process = subprocess.Popen([sys.executable, str(RECORDED_API), str(socket_path), str(tmp_path / "opened.json")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path), verify=False), base_url="http://api",
                        timeout=120)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"the API process exited:\n{process.communicate()[0]}")
            assert time.monotonic() < deadline, "the API process did not come up"
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield RecordedApi(http=http, process=process, record=tmp_path / "opened.json")
    finally:
        http.close()
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)
        socket_path.unlink(missing_ok=True)


def test_the_api_process_opens_no_dataset_file(recorded_api: RecordedApi, settings: Settings, tokens: Tokens,
                                               instance: Instance, tmp_path: Path) -> None:
    http = recorded_api.http
    steward, buyer = tokens.steward(), tokens.buyer()
    register_demo(http, steward, tmp_path, procedures=300)  # type: ignore[arg-type]
    contract = _contract(http, steward)
    # The worker ranks the new version for DP bounding in the background; the same step, awaited here.
    call(worker_socket(settings.dp_socket_root, instance.instance_id), "/datasets/warm-up",
         {"dataset": DATASET, "version": 1})
    answer = _ask(http, buyer, contract)
    assert answer.status_code == 200, answer.text
    assert answer.json()["rows"] and answer.json()["epsilon_spent"] == pytest.approx(0.2)
    mock = http.post(f"/v1/datasets/{DATASET}/versions/1/mock", headers=auth(steward), json={"epsilon": 1.0})
    assert mock.status_code == 201, mock.text
    assert http.get("/v1/budgets", headers=auth(buyer)).status_code == 200
    opened = recorded_api.stop()

    datasets, dp_cache = str(settings.artifacts_dir / "datasets"), str(settings.home_dir / "dp-cache")
    data = [path for path in opened if path.startswith(("call ", datasets, dp_cache))]
    assert data == [], f"the API process opened data: {data}"
    # The record is real: the API wrote the upload to its staging file itself, and that open was noted.
    assert any(Path(path).name.startswith("upload-") for path in opened), "the open() record caught nothing"
    # The data side did the work: the version, its ranked copy for bounding and the mock exist.
    folder = settings.artifacts_dir / "datasets" / DATASET
    assert (folder / "v1.parquet").is_file() and (folder / "v1.mock.parquet").is_file()
    assert any((settings.home_dir / "dp-cache").iterdir())


# --- (b) no worker: 503, nothing spent ------------------------------------------------------------------------

def test_without_a_worker_queries_mocks_and_uploads_are_503_and_spend_nothing(
        api: TestClient, worker_service: LocalHttpServer, instance: Instance, tokens: Tokens,
        tmp_path: Path) -> None:
    steward, buyer = tokens.steward(), tokens.buyer()
    register_demo(api, steward, tmp_path, procedures=300)
    contract = _contract(api, steward)
    worker_service.close()
    before, mock_before = _spent(instance), _mock_spent(instance)

    response = _ask(api, buyer, contract)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["type"].endswith("/worker-unavailable") and "sandbox worker" in problem["detail"]
    assert "nothing was done" in problem["detail"]

    mock = api.post(f"/v1/datasets/{DATASET}/versions/1/mock", headers=auth(steward), json={"epsilon": 1.0})
    assert mock.status_code == 503, mock.text
    path = tmp_path / f"{DATASET}.parquet"
    with path.open("rb") as handle:
        upload = api.post(f"/v1/datasets/{DATASET}/versions", files={"file": (path.name, handle)},
                          headers=auth(steward))
    assert upload.status_code == 503, upload.text

    assert _spent(instance) == before and _mock_spent(instance) == mock_before
    assert _events(instance, "dp.query") == 0 and _events(instance, "dataset.mock.publish") == 0
    assert not list(instance.settings.tmp_dir.glob("upload-*")), "a refused upload was left staged"


# --- (c) a refusal in the worker reaches the buyer unchanged ---------------------------------------------------

def _refusal(function: Any, *args: Any, **kwargs: Any) -> Any:
    """What `function` raises, run in this process: the refusal as the service itself words it."""
    with pytest.raises(SandboxError) as raised:
        function(*args, **kwargs)
    return raised.value


def test_an_over_budget_refusal_in_the_worker_reaches_the_buyer_unchanged(
        api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path) -> None:
    steward, buyer = tokens.steward(), tokens.buyer()
    register_demo(api, steward, tmp_path, procedures=300)
    contract = _contract(api, steward, epsilon=0.5)
    assert _ask(api, buyer, contract, epsilon=0.4).status_code == 200
    before = _spent(instance)
    over = 'SELECT COUNT(*) AS n FROM "carotid-stenting" WHERE age > 70'
    response = _ask(api, buyer, contract, sql=over, epsilon=0.2)
    # What the service itself raises for the same query, in process, is what the buyer reads.
    principal = instance.verifier.verify(buyer)
    local = _refusal(queries.run_query, instance, principal, queries.QueryRequest(
        contract=contract, dataset=DATASET, sql=over, epsilon=0.2))
    assert response.status_code == local.status == 409, response.text
    problem = response.json()
    assert problem["type"].endswith(f"/{local.slug}") and problem["title"] == local.title
    assert problem["detail"] == local.detail
    assert _spent(instance) == before


def test_a_bad_sql_refusal_in_the_worker_reaches_the_buyer_unchanged(
        api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    steward, buyer = tokens.steward(), tokens.buyer()
    register_demo(api, steward, tmp_path, procedures=300)
    contract = _contract(api, steward)
    bad = 'SELECT patient_id FROM "carotid-stenting"'
    with instance.read_session() as session:
        card = get_dataset(session, DATASET).card
    local = _refusal(plan_query, bad, DatasetPrivacy.from_card(card))
    checked = _ask(api, buyer, contract, sql=bad)  # refused by the API's own check, before any forwarding
    # With the API's check out of the way, the worker refuses it, and the buyer reads the same refusal.
    monkeypatch.setattr(queries, "check_query", lambda *args: None)
    forwarded = _ask(api, buyer, contract, sql=bad)
    for response in (checked, forwarded):
        assert response.status_code == local.status == 422, response.text
        problem = response.json()
        assert problem["detail"] == local.detail and problem["errors"] == local.errors
        assert problem["type"].endswith("/invalid")
    assert _spent(instance)[contract] == (0, 0)


def test_a_contract_refused_in_the_worker_is_audited_once(
        api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    steward, buyer = tokens.steward(), tokens.buyer()
    register_demo(api, steward, tmp_path, procedures=300)
    contract = _contract(api, steward)
    assert api.post(f"/v1/contracts/{contract}/revoke", headers=auth(steward)).status_code in {200, 204}
    monkeypatch.setattr(queries, "check_query", lambda *args: None)  # as if revoked between check and run
    response = _ask(api, buyer, contract)
    assert response.status_code == 403 and "revoked" in response.json()["detail"], response.text
    assert _events(instance, "access.denied") == 1
    assert _events(instance, "request.refused") == 0, "the API recorded the worker's refusal a second time"


def test_a_remote_429_keeps_its_retry_after(tmp_path: Path) -> None:
    def busy(_body: dict[str, Any]) -> dict[str, Any]:
        raise TooManyRequests("slow down", retry_after_s=7)

    server = LocalHttpServer(Path(f"/tmp/lh-{os.getpid()}-{time.monotonic_ns() % 10**9}") / "s.sock",
                             {"/busy": busy})
    try:
        with pytest.raises(RemoteProblem) as raised:
            call(server.path, "/busy", {"x": 1})
    finally:
        server.close()
        server.path.parent.rmdir()
    assert (raised.value.status, raised.value.detail, raised.value.slug) == (429, "slow down", "too-many-requests")
    assert raised.value.headers == {"Retry-After": "7"}


def test_the_worker_takes_the_principal_the_api_verified_and_nothing_else(
        api: TestClient, settings: Settings, instance: Instance, tokens: Tokens, tmp_path: Path) -> None:
    steward = tokens.steward()
    register_demo(api, steward, tmp_path, procedures=300)
    contract = _contract(api, steward)
    worker = worker_socket(settings.dp_socket_root, instance.instance_id)
    assert oct(worker.stat().st_mode & 0o777) == oct(0o600)
    query = {"contract": contract, "dataset": DATASET, "sql": SQL, "epsilon": 0.1}
    with pytest.raises(RemoteProblem) as anonymous:
        call(worker, "/dp/query", {"query": query})
    assert anonymous.value.status == 422
    rival = instance.verifier.verify(tokens.buyer(org="rival"))
    with pytest.raises(RemoteProblem) as other_org:
        call(worker, "/dp/query", {"principal": principal_body(rival), "query": query})
    assert other_org.value.status in {403, 404}
    with pytest.raises(RemoteProblem) as elsewhere:
        call(worker, "/datasets/versions", {"principal": principal_body(instance.verifier.verify(steward)),
                                            "dataset": DATASET, "upload": "/etc/passwd", "filename": "x.csv"})
    assert elsewhere.value.status == 422 and "staged" in elsewhere.value.detail
    assert _spent(instance)[contract] == (0, 0)


def test_an_answer_keeps_its_own_fields_and_a_refusal_its_extras() -> None:
    def released(_body: dict[str, Any]) -> dict[str, Any]:
        return {"status": "released", "path": "exports/a.csv"}

    def refused(_body: dict[str, Any]) -> dict[str, Any]:
        raise Invalid("two problems", errors=["one", "two"])

    server = LocalHttpServer(Path(f"/tmp/lh-{os.getpid()}-{time.monotonic_ns() % 10**9}") / "s.sock",
                             {"/released": released, "/refused": refused})
    try:
        assert call(server.path, "/released", {"x": 1}) == {"status": "released", "path": "exports/a.csv"}
        with pytest.raises(RemoteProblem) as raised:
            call(server.path, "/refused", {"x": 1})
    finally:
        server.close()
        server.path.parent.rmdir()
    assert (raised.value.status, raised.value.detail) == (422, "two problems")
    assert raised.value.extra == {"errors": ["one", "two"]}
