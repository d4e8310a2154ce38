"""One buyer cannot exhaust the service: long-polls hold no thread and are limited per token, and an
org's waiting jobs and stored code are capped, each refusal a 429 with Retry-After (review 11.14)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from jobworld import pack
from sqlalchemy import text

from sandbox.instance import Instance
from sandbox.store.models import ImageRecord


@pytest.fixture
def submit(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path) -> Callable[..., httpx.Response]:
    """Submits jobs that stay queued: no worker runs here, the image is recorded as present."""
    steward = tokens.steward()
    register_demo(api, steward, tmp_path)
    contract = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
        "purpose": "fair use", "valid_until": "2099-01-01", "epsilon": 1.0, "quotas": {"cpu_hours": 10}})
    assert contract.status_code == 201, contract.text
    with instance.sessions() as session:
        session.add(ImageRecord(name="analysis", image_id="sha256:" + "0" * 64, seen_at=datetime.now(UTC)))
        session.commit()
    buyer = tokens.buyer()

    def send(code: dict[str, bytes] | None = None, token: str | None = None) -> httpx.Response:
        spec = {"contract": contract.json()["id"], "dataset": "carotid-stenting", "image": "analysis",
                "command": ["python", "main.py"]}
        bundle = pack(code or {"main.py": b"print(1)\n"})
        return api.post("/v1/jobs", headers=auth(token or buyer), data={"spec": json.dumps(spec)},
                        files={"code": ("code.tar.gz", bundle, "application/gzip")})

    return send


def _pending(api: TestClient) -> int:
    counts = getattr(api.app.state, "long_polls", None)  # type: ignore[attr-defined]
    return sum(counts.values()) if counts else 0


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sixty_long_polls_leave_healthz_answering(api: TestClient, tokens: Tokens,
                                                  submit: Callable[..., httpx.Response]) -> None:
    job = submit()
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    pollers = [tokens.buyer(sub=f"poller-{n}") for n in range(60)]
    with ThreadPoolExecutor(len(pollers) + 1) as pool:
        polls: list[Future[httpx.Response]] = [
            pool.submit(api.get, f"/v1/jobs/{job_id}", params={"wait_s": 30, "since": "queued"},
                        headers=auth(token)) for token in pollers]
        deadline = time.monotonic() + 10
        while _pending(api) < len(pollers) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Before the fix each wait held a worker thread; /healthz queued behind them for ~30 s.
        try:
            health = pool.submit(api.get, "/healthz").result(timeout=10)
        except TimeoutError:
            raise AssertionError("/healthz did not answer while 60 long-polls waited") from None
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        waiting = sum(not poll.done() for poll in polls)
        assert waiting == len(pollers), f"only {waiting} long-polls were still waiting when /healthz answered"
        # Other calls that need a thread answer too, and the change ends every wait.
        cancelled = api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(pollers[0]))
        assert cancelled.status_code == 200, cancelled.text
        answers = [poll.result(timeout=30) for poll in polls]
    assert all(a.status_code == 200 and a.json()["state"] == "cancelled" for a in answers)
    assert _pending(api) == 0


def test_long_polls_are_limited_per_token(api: TestClient, instance: Instance, tokens: Tokens,
                                          submit: Callable[..., httpx.Response]) -> None:
    instance.settings.max_long_polls_per_token = 3
    job_id = submit().json()["id"]
    greedy = tokens.buyer(sub="greedy")
    params = {"wait_s": 20, "since": "queued"}
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(api.get, f"/v1/jobs/{job_id}", params=params, headers=auth(greedy)) for _ in range(3)]
        _wait_for(lambda: _pending(api) == 3, "three long-polls to be waiting")
        refused = api.get(f"/v1/jobs/{job_id}", params=params, headers=auth(greedy))
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert int(refused.headers["retry-after"]) >= 1
        # A plain read is no long-poll, and another token has its own allowance.
        assert api.get(f"/v1/jobs/{job_id}", headers=auth(greedy)).status_code == 200
        other = pool.submit(api.get, f"/v1/jobs/{job_id}", params=params, headers=auth(tokens.buyer(sub="other")))
        _wait_for(lambda: _pending(api) == 4, "the other token's long-poll to be waiting")
        assert api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(greedy)).status_code == 200
        assert all(poll.result(timeout=30).status_code == 200 for poll in [*held, other])
    # The slots come back once the waits answer.
    assert api.get(f"/v1/jobs/{job_id}", params={"wait_s": 1, "since": "queued"},
                   headers=auth(greedy)).status_code == 200


def test_waiting_jobs_are_capped_per_org(api: TestClient, instance: Instance, tokens: Tokens,
                                         submit: Callable[..., httpx.Response]) -> None:
    instance.settings.max_waiting_jobs_per_org = 2
    first, second = submit(), submit()
    assert first.status_code == second.status_code == 201
    # Another member of the same org shares the org's allowance.
    third = submit(token=tokens.buyer(sub="colleague"))
    assert third.status_code == 429, third.text
    assert third.headers["content-type"].startswith("application/problem+json")
    assert int(third.headers["retry-after"]) > 0
    assert "waiting" in third.json()["detail"]
    assert api.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=auth(tokens.buyer())).status_code == 200
    assert submit().status_code == 201, "a slot freed by a cancelled job was not given back"


def test_stored_code_is_capped_per_org(api: TestClient, instance: Instance, tokens: Tokens,
                                       submit: Callable[..., httpx.Response]) -> None:
    instance.settings.max_bundle_bytes_per_org = 50_000
    code = {"data.bin": bytes(range(256)) * 100}  # 25,600 bytes unpacked
    assert submit(code).status_code == 201
    refused = submit(code)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) > 0
    assert "stores" in refused.json()["detail"]
    staged = list((instance.settings.tmp_dir).glob("bundle-*"))
    assert not staged, f"a refused bundle stayed staged: {staged}"
    assert submit({"main.py": b"print(1)\n"}).status_code == 201, "a small bundle under the cap was refused"


def test_bundles_unpack_before_the_submit_transaction(instance: Instance,
                                                      submit: Callable[..., httpx.Response]) -> None:
    """Unpacking inside the transaction once held every other writer for seconds (review 11.13)."""
    if instance.settings.database_url:
        pytest.skip("SQLite's single writer lock is what makes the order observable")
    home = instance.settings.home_dir
    with ThreadPoolExecutor(1) as pool, instance.engine.connect() as blocker:
        transaction = blocker.begin()  # another writer holds the database
        blocker.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))
        pending = pool.submit(submit)
        _wait_for(lambda: any(home.rglob("code/main.py")), "the bundle to unpack while another writer holds the store")
        assert not pending.done(), "the submission finished while the store was locked"
        transaction.rollback()
        created = pending.result(timeout=60)
    assert created.status_code == 201, created.text
    job_code = home / "artifacts" / "jobs" / created.json()["id"] / "code" / "main.py"
    assert job_code.read_bytes() == b"print(1)\n"
    assert not list(instance.settings.tmp_dir.glob("bundle-*")), "the staged bundle was left behind"
