"""Truncation: the database and its backups hold older, validly signed heads; checkpoints kept outside it
catch a chain cut back to one of them, or rewritten from there (review 11.12)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from sqlalchemy import text

from sandbox.audit import Checkpoint, read_checkpoints, verify_chain
from sandbox.auth.tokens import Role
from sandbox.instance import Instance


def _cli(instance: Instance, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"SANDBOX_HOME": str(instance.settings.home_dir), "PATH": "/usr/bin:/bin"}
    if instance.settings.database_url:
        env["SANDBOX_DATABASE_URL"] = instance.settings.database_url
    return subprocess.run([sys.executable, "-m", "sandbox.cli", "audit", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def _head(instance: Instance) -> tuple[int, str, str]:
    with instance.engine.connect() as connection:
        row = connection.execute(text("SELECT seq, hash, signature FROM audit_head")).one()
    return int(row[0]), str(row[1]), str(row[2])


def _roll_back_to(instance: Instance, head: tuple[int, str, str]) -> None:
    """What an operator with the database (or a restored backup) can do: drop the newest events, and put
    back the older head, whose signature is genuine."""
    seq, hash_, signature = head
    with instance.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE seq > :s"), {"s": seq})
        connection.execute(text("UPDATE audit_head SET seq = :s, hash = :h, signature = :g"),
                           {"s": seq, "h": hash_, "g": signature})


def _db_only(instance: Instance) -> bool:
    with instance.sessions() as session:
        return verify_chain(session, instance.public_key).ok


def test_every_committed_head_is_checkpointed(api: TestClient, tokens: Tokens, instance: Instance,
                                             tmp_path: Path) -> None:
    register_demo(api, tokens.steward(), tmp_path)
    checkpoints, unreadable = read_checkpoints(instance.settings.audit_checkpoint_path)
    seq, hash_, _ = _head(instance)
    assert unreadable == 0 and checkpoints, "no checkpoint was written outside the database"
    assert max(c.seq for c in checkpoints) == seq
    assert Checkpoint(seq=seq, hash=hash_, signature=_head(instance)[2]) in checkpoints
    assert all(c.is_signed_by(instance.public_key) for c in checkpoints)
    result = _cli(instance, "verify")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_rolled_back_transaction_leaves_no_checkpoint(instance: Instance) -> None:
    before = read_checkpoints(instance.settings.audit_checkpoint_path)[0]
    try:
        with instance.system_context() as ctx:
            ctx.record("test.event", "test", "x")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    after = read_checkpoints(instance.settings.audit_checkpoint_path)[0]
    assert after == before, "a head that never committed was checkpointed: verify would fail forever"
    assert _cli(instance, "verify").returncode == 0


def test_truncation_to_an_older_signed_head_is_caught(api: TestClient, tokens: Tokens, instance: Instance,
                                                      tmp_path: Path) -> None:
    register_demo(api, tokens.steward(), tmp_path)
    older = _head(instance)
    api.get("/v1/audit", headers=auth(tokens.auditor()))
    instance.issue_token(sub="late", org="acme", role=Role.BUYER, ttl_s=60)
    newest = _head(instance)[0]
    _roll_back_to(instance, older)
    assert _db_only(instance), "the attack needs the database alone to look intact"
    result = _cli(instance, "verify")
    assert result.returncode == 1, f"truncating events {older[0] + 1}..{newest} went unnoticed: {result.stdout}"
    assert f"names event {newest}" in result.stderr + result.stdout


def test_an_auditors_checkpoint_catches_truncation_without_the_instance_file(
        api: TestClient, tokens: Tokens, instance: Instance, tmp_path: Path) -> None:
    register_demo(api, tokens.steward(), tmp_path)
    older = _head(instance)
    instance.issue_token(sub="late", org="acme", role=Role.BUYER, ttl_s=60)
    kept = tmp_path / "auditor" / "checkpoint.json"
    kept.parent.mkdir()
    exported = _cli(instance, "checkpoint", "--out", str(kept))
    assert exported.returncode == 0, exported.stderr
    body = json.loads(kept.read_text())
    assert body["seq"] == _head(instance)[0] and body["algorithm"] == "Ed25519"
    assert _cli(instance, "verify", "--checkpoint", str(kept)).returncode == 0
    # The operator also removes the instance's own file; the auditor's copy still holds.
    _roll_back_to(instance, older)
    instance.settings.audit_checkpoint_path.unlink()
    assert _cli(instance, "verify").returncode == 0, "without any checkpoint only the chain can be checked"
    result = _cli(instance, "verify", "--checkpoint", str(kept))
    assert result.returncode == 1 and "checkpoint" in result.stderr + result.stdout


def test_a_chain_rewritten_after_a_checkpoint_is_caught(api: TestClient, tokens: Tokens, instance: Instance,
                                                        tmp_path: Path) -> None:
    register_demo(api, tokens.steward(), tmp_path)
    older = _head(instance)
    instance.issue_token(sub="first", org="acme", role=Role.BUYER, ttl_s=60)
    instance.issue_token(sub="second", org="acme", role=Role.BUYER, ttl_s=60)
    kept = tmp_path / "kept.json"
    assert _cli(instance, "checkpoint", "--out", str(kept)).returncode == 0
    _roll_back_to(instance, older)
    # New, different events grow the chain past the checkpoint's length again; the instance's own file,
    # which would disagree too, is removed.
    for n in range(4):
        instance.issue_token(sub=f"other-{n}", org="acme", role=Role.BUYER, ttl_s=60)
    instance.settings.audit_checkpoint_path.unlink()
    assert _db_only(instance)
    result = _cli(instance, "verify", "--checkpoint", str(kept))
    seq = json.loads(kept.read_text())["seq"]
    assert result.returncode == 1, "a chain rewritten from an older head passed the auditor's checkpoint"
    assert f"event {seq} differs" in result.stderr + result.stdout


def test_a_forged_checkpoint_is_refused(instance: Instance, tmp_path: Path) -> None:
    seq = _head(instance)[0]
    forged = tmp_path / "forged.json"
    forged.write_text(Checkpoint(seq=seq + 5, hash="f" * 64, signature="00" * 64).to_json())
    result = _cli(instance, "verify", "--checkpoint", str(forged))
    assert result.returncode == 1 and "not signed" in result.stderr + result.stdout


def test_a_line_cut_short_by_a_crash_is_skipped_not_fatal(instance: Instance) -> None:
    with instance.settings.audit_checkpoint_path.open("a") as handle:
        handle.write('{"seq": 9')
    result = _cli(instance, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not be read" in result.stderr


def test_the_verify_route_checks_the_instance_checkpoints_too(api: TestClient, tokens: Tokens, instance: Instance,
                                                              tmp_path: Path) -> None:
    register_demo(api, tokens.steward(), tmp_path)
    older = _head(instance)
    instance.issue_token(sub="late", org="acme", role=Role.BUYER, ttl_s=60)
    _roll_back_to(instance, older)
    assert _db_only(instance), "the attack needs the database alone to look intact"
    report = api.get("/v1/audit/verify", headers=auth(tokens.auditor())).json()
    assert report["ok"] is False, f"the API called a truncated chain intact: {report}"
