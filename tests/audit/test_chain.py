"""The audit chain: any change, deletion or reordering of stored events is caught and named."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from sqlalchemy import select, text

from sandbox.audit import verify_chain
from sandbox.instance import Instance
from sandbox.store.models import AuditEvent


def _seed(api: TestClient, tokens: Tokens, tmp_path: Path) -> None:
    register_demo(api, tokens.steward(), tmp_path)
    api.get("/v1/audit", headers=auth(tokens.auditor()))


def _verify(instance: Instance) -> tuple[bool, int | None, str | None]:
    with instance.sessions() as session:
        report = verify_chain(session, instance.public_key)
    return report.ok, report.first_bad_seq, report.problem


def _cli_verify(instance: Instance) -> subprocess.CompletedProcess[str]:
    env = {"SANDBOX_HOME": str(instance.settings.home_dir), "PATH": "/usr/bin:/bin"}
    if instance.settings.database_url:
        env["SANDBOX_DATABASE_URL"] = instance.settings.database_url
    return subprocess.run([sys.executable, "-m", "sandbox.cli", "audit", "verify"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_intact_chain_verifies(api: TestClient, tokens: Tokens, instance: Instance, tmp_path: Path) -> None:
    _seed(api, tokens, tmp_path)
    ok, _bad, problem = _verify(instance)
    assert ok, problem
    result = _cli_verify(instance)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact" in result.stdout


def test_every_write_and_sensitive_read_is_recorded(api: TestClient, tokens: Tokens, instance: Instance,
                                                    tmp_path: Path) -> None:
    _seed(api, tokens, tmp_path)
    with instance.sessions() as session:
        events = list(session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars())
    by_action = {e.action: e for e in events}
    for action in ("instance.init", "policy.bootstrap", "token.issue", "dataset.create", "dataset.version.add",
                   "audit.read"):
        assert action in by_action, f"no {action} event was written"
    upload = by_action["dataset.version.add"]
    assert upload.actor == "steward-1" and upload.org == "hospital" and upload.role == "steward"
    assert upload.object_id == "carotid-stenting@1" and len(upload.details["sha256"]) == 64
    assert all(e.prev_hash == p.hash for p, e in itertools.pairwise(events)), "chain links broken"


def test_changed_event_is_named(api: TestClient, tokens: Tokens, instance: Instance, tmp_path: Path) -> None:
    _seed(api, tokens, tmp_path)
    with instance.engine.begin() as connection:
        target = connection.execute(text("SELECT seq FROM audit_events WHERE action = 'dataset.create'")).scalar_one()
        connection.execute(text("UPDATE audit_events SET actor = 'someone-else' WHERE seq = :seq"), {"seq": target})
    ok, bad, problem = _verify(instance)
    assert not ok and bad == target, f"a changed event {target} went unnoticed ({bad}, {problem})"
    assert problem is not None and "changed" in problem
    result = _cli_verify(instance)
    assert result.returncode == 1 and f"event {target}" in result.stderr + result.stdout


def test_changed_details_are_caught(api: TestClient, tokens: Tokens, instance: Instance, tmp_path: Path) -> None:
    _seed(api, tokens, tmp_path)
    with instance.engine.begin() as connection:
        target = connection.execute(
            text("SELECT seq FROM audit_events WHERE action = 'dataset.version.add'")).scalar_one()
        connection.execute(text("UPDATE audit_events SET details = :d WHERE seq = :seq"),
                           {"d": '{"rows": 1}', "seq": target})
    ok, bad, _ = _verify(instance)
    assert not ok and bad == target


def test_deleted_event_is_named(api: TestClient, tokens: Tokens, instance: Instance, tmp_path: Path) -> None:
    _seed(api, tokens, tmp_path)
    with instance.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    ok, bad, problem = _verify(instance)
    assert not ok and bad == 3, f"deleting event 3 went unnoticed ({bad}, {problem})"
    assert problem is not None and "missing" in problem
    result = _cli_verify(instance)
    assert result.returncode == 1 and "event 3" in result.stderr + result.stdout


def test_deleted_newest_event_is_caught_by_signed_head(api: TestClient, tokens: Tokens, instance: Instance,
                                                       tmp_path: Path) -> None:
    _seed(api, tokens, tmp_path)
    with instance.engine.begin() as connection:
        newest = connection.execute(text("SELECT max(seq) FROM audit_events")).scalar_one()
        connection.execute(text("DELETE FROM audit_events WHERE seq = :seq"), {"seq": newest})
    ok, bad, problem = _verify(instance)
    assert not ok and bad == newest, f"truncating the newest event went unnoticed ({problem})"


def test_forged_head_is_caught(api: TestClient, tokens: Tokens, instance: Instance, tmp_path: Path) -> None:
    _seed(api, tokens, tmp_path)
    with instance.engine.begin() as connection:
        newest = connection.execute(text("SELECT max(seq) FROM audit_events")).scalar_one()
        previous = connection.execute(text("SELECT hash FROM audit_events WHERE seq = :s"),
                                      {"s": newest - 1}).scalar_one()
        connection.execute(text("DELETE FROM audit_events WHERE seq = :seq"), {"seq": newest})
        connection.execute(text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": newest - 1, "h": previous})
    ok, _, problem = _verify(instance)
    assert not ok and problem is not None and "head" in problem


@pytest.mark.parametrize("first,second", [(2, 5), (4, 5)])
def test_reordered_events_are_named(api: TestClient, tokens: Tokens, instance: Instance, tmp_path: Path,
                                    first: int, second: int) -> None:
    _seed(api, tokens, tmp_path)
    # Swap the sequence numbers of two events: every field stays, only the order changes.
    with instance.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET seq = -1 WHERE seq = :a"), {"a": first})
        connection.execute(text("UPDATE audit_events SET seq = :a WHERE seq = :b"), {"a": first, "b": second})
        connection.execute(text("UPDATE audit_events SET seq = :b WHERE seq = -1"), {"b": second})
    ok, bad, problem = _verify(instance)
    assert not ok and bad == first, f"swapping events {first} and {second} went unnoticed ({bad}, {problem})"


def test_audit_endpoint_is_newest_first_and_for_stewards_and_auditors(api: TestClient, tokens: Tokens,
                                                                     tmp_path: Path) -> None:
    _seed(api, tokens, tmp_path)
    events = api.get("/v1/audit", headers=auth(tokens.auditor())).json()
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) > 5
    assert api.get("/v1/audit", headers=auth(tokens.steward())).status_code == 200
    assert api.get("/v1/audit", headers=auth(tokens.buyer())).status_code == 403
    older = api.get("/v1/audit", params={"before": seqs[2], "limit": 2}, headers=auth(tokens.auditor())).json()
    assert [e["seq"] for e in older] == seqs[3:5]


def test_concurrent_writes_keep_one_chain(instance: Instance, tokens: Tokens) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sandbox.auth.tokens import Role

    def issue(n: int) -> None:
        instance.issue_token(sub=f"user-{n}", org="acme", role=Role.BUYER, ttl_s=60)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(issue, range(40)))
    ok, bad, problem = _verify(instance)
    assert ok, f"concurrent appends forked the chain at {bad}: {problem}"
