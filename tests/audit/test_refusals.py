"""Refusals are recorded (review 11.11): an identified caller's 403s and 404s on the signed audit chain,
with actor, route, object and reason, bounded; an unidentified caller's only in the rate-limited
security log, never on the chain, however long the text it sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from sqlalchemy import func, select

from sandbox.instance import Instance
from sandbox.security_log import MAX_FIELD, SecurityLog
from sandbox.store.models import AuditEvent

LONG_ID = "j-" + "A" * 15_000
BOUND = MAX_FIELD  # a bounded field, the note of its original length included


def _events(instance: Instance, after: int = 0) -> list[AuditEvent]:
    with instance.sessions() as session:
        return list(session.execute(select(AuditEvent).where(AuditEvent.seq > after).order_by(AuditEvent.seq))
                    .scalars())


def _head(instance: Instance) -> int:
    with instance.sessions() as session:
        return int(session.execute(select(func.coalesce(func.max(AuditEvent.seq), 0))).scalar_one())


def _security_log(api: TestClient) -> SecurityLog:
    log: SecurityLog = api.app.state.security_log  # type: ignore[attr-defined]
    return log


def _refusals(instance: Instance, after: int) -> list[AuditEvent]:
    return [e for e in _events(instance, after) if e.action == "request.refused"]


def test_a_role_refusal_is_audited_with_actor_route_and_reason(api: TestClient, tokens: Tokens,
                                                               instance: Instance) -> None:
    buyer = tokens.buyer(org="acme", sub="mallory")
    before = _head(instance)
    response = api.post("/v1/contracts", headers=auth(buyer), json={})
    assert response.status_code == 403, response.text
    [event] = _refusals(instance, before)
    assert (event.actor, event.org, event.role) == ("mallory", "acme", "buyer"), "the refusal names no actor"
    assert event.details["route"] == "/v1/contracts" and event.details["method"] == "POST"
    assert event.details["status"] == 403 and "buyer" in event.details["reason"], event.details


def test_another_orgs_object_is_a_404_that_is_audited(api: TestClient, tokens: Tokens, instance: Instance,
                                                      tmp_path: Path) -> None:
    steward = tokens.steward("ana", org="hospital")
    register_demo(api, steward, tmp_path)
    contract = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
        "purpose": "x", "valid_until": "2099-01-01", "epsilon": 1.0}).json()["id"]
    before = _head(instance)
    probes: list[tuple[str, str, dict[str, Any] | None]] = [
        (tokens.buyer(org="evil", sub="eve"), f"/v1/contracts/{contract}", None),
        (tokens.steward("carl", org="clinic"), f"/v1/contracts/{contract}/revoke", {}),
    ]
    for token, path, body in probes:
        response = api.post(path, headers=auth(token), json=body) if body is not None else \
            api.get(path, headers=auth(token))
        assert response.status_code in (403, 404), response.text
    refused = _refusals(instance, before)
    assert [(e.actor, e.object_id) for e in refused] == [("eve", contract), ("carl", contract)], \
        "a cross-org probe left no trace"
    assert refused[1].details["route"] == "/v1/contracts/{contract_id}/revoke"


def test_a_long_id_is_bounded_in_the_audit_event(api: TestClient, tokens: Tokens, instance: Instance) -> None:
    before = _head(instance)
    response = api.get(f"/v1/jobs/{LONG_ID}", headers=auth(tokens.buyer()))
    assert response.status_code == 404
    [event] = _refusals(instance, before)
    assert len(event.object_id) <= BOUND and event.object_id.startswith("j-AAAA"), len(event.object_id)
    assert all(len(str(v)) <= BOUND for v in event.details.values()), "an unbounded field reached the chain"


def test_unauthenticated_refusals_go_to_the_security_log_only(api: TestClient, instance: Instance) -> None:
    before = _head(instance)
    security = _security_log(api)
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Bearer " + "x" * 15_000}):
        assert api.get(f"/v1/jobs/{LONG_ID}", headers=headers).status_code == 401
    assert _events(instance, before) == [], "an unauthenticated caller wrote to the signed chain"
    lines = [line for line in security.recent if line["status"] == "401"]
    assert len(lines) == 3, lines
    assert all(len(value) <= BOUND for line in lines for value in line.values()), "unbounded security-log field"


def test_the_notebook_proxy_writes_no_event_for_an_unauthenticated_long_id(api: TestClient,
                                                                             instance: Instance) -> None:
    """The review's attack: a 15,000-character id in an unauthenticated request to the proxy."""
    before = _head(instance)
    security = _security_log(api)
    for credentials in ({"params": {"token": "guess"}}, {"headers": {"Authorization": "token guess"}}, {}):
        response = api.get(f"/notebooks/{LONG_ID}/api/kernels", **credentials)  # type: ignore[arg-type]
        assert response.status_code in (401, 403), response.text[:200]
    assert _events(instance, before) == [], "the proxy signed an attacker's text into the audit chain"
    lines = [line for line in security.recent if line["path"].startswith("/notebooks/")]
    assert len(lines) == 3, lines
    for line in lines:
        assert len(line["path"]) <= BOUND and line["path"].endswith(f"[{len(LONG_ID) + 23} chars]"), line["path"][-40:]


def test_the_notebook_proxy_audits_an_identified_callers_refusal(api: TestClient, tokens: Tokens,
                                                                   instance: Instance) -> None:
    before = _head(instance)
    response = api.get(f"/notebooks/{LONG_ID}/api/kernels", headers=auth(tokens.buyer(org="evil", sub="eve")))
    assert response.status_code == 403
    [event] = [e for e in _events(instance, before) if e.action == "notebook.access.denied"]
    assert event.actor == "eve" and len(event.object_id) <= BOUND


def test_the_security_log_is_rate_limited_per_client() -> None:
    now = [0.0]
    lines: list[dict[str, str]] = []
    log = SecurityLog(per_client=5, window_s=60, emit=lines.append)
    for _ in range(100):
        log.refusal(client="203.0.113.9", status=401, method="GET", path="/v1/jobs", reason="bad", clock=lambda: now[0])
    log.refusal(client="198.51.100.1", status=401, method="GET", path="/v1/jobs", reason="bad", clock=lambda: now[0])
    assert [line["client"] for line in lines] == ["203.0.113.9"] * 5 + ["198.51.100.1"], "not limited per client"
    now[0] = 61.0
    log.refusal(client="203.0.113.9", status=401, method="GET", path="/v1/jobs", reason="bad", clock=lambda: now[0])
    assert lines[-1]["suppressed_before"] == "95", "the dropped count of the last window is not reported"


def test_api_flood_of_bad_tokens_is_rate_limited(api: TestClient) -> None:
    security = _security_log(api)
    for _ in range(security.per_client + 30):
        assert api.get("/v1/whoami", headers={"Authorization": "Bearer junk"}).status_code == 401
    written = [line for line in security.recent if line["path"] == "/v1/whoami"]
    assert len(written) == security.per_client, f"{len(written)} lines for one client's flood"


def test_a_refusal_inside_a_write_is_recorded_once(api: TestClient, tokens: Tokens, instance: Instance,
                                                   tmp_path: Path) -> None:
    # The service refuses a steward who would grant their own org a contract inside its write transaction,
    # which records the refusal itself; the API's handler must not add a second event.
    steward = tokens.steward("ana", org="hospital")
    register_demo(api, steward, tmp_path)
    before = _head(instance)
    response = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "hospital", "datasets": ["carotid-stenting"], "tier": "trusted", "kinds": ["analysis"],
        "purpose": "self-dealing", "valid_until": "2099-01-01", "epsilon": 100.0})
    assert response.status_code == 403, response.text
    recorded = [e for e in _events(instance, before) if e.action in ("access.denied", "request.refused")]
    assert len(recorded) == 1, [(e.action, e.object_id) for e in recorded]
    assert all(len(e.object_id) <= BOUND for e in recorded)
