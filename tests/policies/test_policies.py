"""Policies: shipped files obey the schema; changes need a second steward; contracts pin versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card
from jsonschema import Draft202012Validator
from sqlalchemy import select

from sandbox.config import REPO_ROOT, Settings
from sandbox.instance import Instance, init_instance
from sandbox.policies import (
    APPROVED,
    PENDING,
    load_shipped_policies,
    policy_errors,
    resolve_policy,
    sync_shipped_policies,
)
from sandbox.store.models import Policy

POLICIES_DIR = REPO_ROOT / "policies"
SHIPPED = sorted(POLICIES_DIR.glob("*.yaml"))
PROBLEM_JSON = "application/problem+json"


def test_the_schema_is_a_valid_json_schema() -> None:
    Draft202012Validator.check_schema(json.loads((POLICIES_DIR / "policy.schema.json").read_text()))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_policy_validates(path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    assert policy_errors(body, POLICIES_DIR) == [], f"{path.name} breaks the schema"
    assert body["name"] == path.stem


def test_the_expected_policies_ship() -> None:
    assert set(load_shipped_policies(POLICIES_DIR)) == {"default", "strict", "dp-only"}


def stored(instance: Instance) -> dict[str, str]:
    with instance.sessions() as session:
        return {f"{p.name}@{p.version}": p.status for p in session.execute(select(Policy)).scalars()}


def test_init_stores_shipped_policies_as_approved_once(instance: Instance, settings: Settings) -> None:
    assert stored(instance) == {"default@1": APPROVED, "strict@1": APPROVED, "dp-only@1": APPROVED}
    assert init_instance(settings).policies_added == [], "a second init added policy versions"
    assert len(stored(instance)) == 3


def test_cli_init_stores_the_shipped_policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from sandbox.cli import app

    monkeypatch.delenv("SANDBOX_DATABASE_URL", raising=False)
    home = tmp_path / "cli-home"
    first = CliRunner().invoke(app, ["init", "--home", str(home)])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, ["init", "--home", str(home)])
    assert second.exit_code == 0 and "stored policy" not in second.output, second.output
    opened = Instance(Settings(home=home))
    try:
        assert stored(opened) == {"default@1": APPROVED, "strict@1": APPROVED, "dp-only@1": APPROVED}
    finally:
        opened.close()


def changed_default(api: TestClient, token: str, **runtime: Any) -> dict[str, Any]:
    body: dict[str, Any] = api.get("/v1/policies/default/versions/1", headers=auth(token)).json()["body"]
    body["runtime"] = {**body["runtime"], **runtime}
    return body


def test_schema_violations_are_422_with_paths(api: TestClient, tokens: Tokens) -> None:
    steward = tokens.steward()
    body = changed_default(api, steward, max_cpus=-1)
    body["review"]["reviewers"] = 5
    body["egress"]["allowed_kinds"] = ["table", "pickle"]
    body["backdoor"] = {"skip_review": True}
    del body["description"]
    response = api.post("/v1/policies", json=body, headers=auth(steward))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    errors = response.json()["errors"]
    for path in ("runtime/max_cpus", "review/reviewers", "egress/allowed_kinds/1", "(top)"):
        assert any(e.startswith(f"{path}:") for e in errors), f"no error at {path}: {errors}"
    assert any("backdoor" in e for e in errors) and any("description" in e for e in errors), errors
    for not_a_policy in ([1, 2], "name: default", None):
        response = api.post("/v1/policies", json=not_a_policy, headers=auth(steward))
        assert response.status_code == 422, f"{not_a_policy!r}: {response.text}"
    assert len(api.get("/v1/policies", headers=auth(steward)).json()) == 3, "an invalid policy was stored"


def test_a_change_needs_a_second_steward(api: TestClient, tokens: Tokens) -> None:
    author, reviewer = tokens.steward("steward-1"), tokens.steward("steward-2")
    setup = api.post("/v1/datasets", json=demo_card(), headers=auth(author))
    assert setup.status_code == 201

    assert api.post("/v1/policies", json=changed_default(api, author, max_cpus=2),
                    headers=auth(tokens.buyer())).status_code == 403, "a buyer proposed a policy"
    proposed = api.post("/v1/policies", json=changed_default(api, author, max_cpus=2), headers=auth(author))
    assert proposed.status_code == 201, proposed.text
    assert proposed.json()["ref"] == "default@2" and proposed.json()["status"] == PENDING

    contract = {"buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
                "purpose": "test", "valid_until": "2099-01-01", "epsilon": 1.0}
    before = api.post("/v1/contracts", json=contract, headers=auth(author))
    assert before.json()["policy"] == "default@1", "a pending policy was pinned"

    self_approved = api.post("/v1/policies/default/versions/2/approve", headers=auth(author))
    assert self_approved.status_code == 403, f"the author approved their own change: {self_approved.text}"
    author_again = tokens.steward("steward-1")
    assert api.post("/v1/policies/default/versions/2/approve",
                    headers=auth(author_again)).status_code == 403, "a fresh token of the author approved"
    assert api.post("/v1/policies/default/versions/2/approve",
                    headers=auth(tokens.buyer())).status_code == 403

    approved = api.post("/v1/policies/default/versions/2/approve", json={"comment": "fewer cpus"},
                        headers=auth(reviewer))
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == APPROVED and approved.json()["decided_by"] == "steward-2"
    again = api.post("/v1/policies/default/versions/2/approve", headers=auth(tokens.steward("steward-3")))
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM_JSON, again.text

    after = api.post("/v1/contracts", json=contract, headers=auth(author))
    assert after.json()["policy"] == "default@2", "a new contract did not pin the approved version"
    assert api.get(f"/v1/contracts/{before.json()['id']}", headers=auth(author)).json()["policy"] == "default@1", \
        "an existing contract moved to the new policy version"

    events = api.get("/v1/audit", headers=auth(tokens.auditor())).json()
    decisions = {(e["action"], e["actor"]) for e in events if e["object_id"] == "default@2"}
    assert ("policy.propose", "steward-1") in decisions and ("policy.approve", "steward-2") in decisions, decisions
    denied = [e for e in events if e["action"] == "access.denied" and e["actor"] == "steward-1"]
    assert denied, "the refused self-approval was not audited"


def test_rejected_versions_are_never_pinned(api: TestClient, tokens: Tokens) -> None:
    author, reviewer = tokens.steward("steward-1"), tokens.steward("steward-2")
    assert api.post("/v1/datasets", json=demo_card(), headers=auth(author)).status_code == 201
    body = api.get("/v1/policies/strict/versions/1", headers=auth(author)).json()["body"]
    body["review"] = {"auto_release": True, "reviewers": 1}
    assert api.post("/v1/policies", json=body, headers=auth(author)).json()["ref"] == "strict@2"
    rejected = api.post("/v1/policies/strict/versions/2/reject", json={"comment": "no"}, headers=auth(reviewer))
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected", rejected.text
    assert api.post("/v1/policies/strict/versions/2/approve",
                    headers=auth(tokens.steward("steward-3"))).status_code == 409
    contract = {"buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "trusted", "kinds": ["analysis"],
                "purpose": "test", "valid_until": "2099-01-01", "epsilon": 1.0}
    assert api.post("/v1/contracts", json={**contract, "policy": "strict"},
                    headers=auth(author)).json()["policy"] == "strict@1"
    assert api.post("/v1/contracts", json={**contract, "policy": "strict@2"},
                    headers=auth(author)).status_code == 422
    events = api.get("/v1/audit", params={"action": "policy.reject"}, headers=auth(tokens.auditor())).json()
    assert [(e["object_id"], e["actor"]) for e in events] == [("strict@2", "steward-2")]


def test_identical_content_is_409(api: TestClient, tokens: Tokens) -> None:
    steward = tokens.steward()
    current = api.get("/v1/policies/default/versions/1", headers=auth(steward)).json()["body"]
    response = api.post("/v1/policies", json=current, headers=auth(steward))
    assert response.status_code == 409 and response.headers["content-type"] == PROBLEM_JSON, response.text
    changed = changed_default(api, steward, max_gpus=0)
    assert api.post("/v1/policies", json=changed, headers=auth(steward)).status_code == 201
    assert api.post("/v1/policies", json=changed, headers=auth(tokens.steward("steward-2"))).status_code == 409, \
        "the same pending change was proposed twice"


def test_a_changed_shipped_file_becomes_pending(instance: Instance, settings: Settings, tmp_path: Path) -> None:
    copy = tmp_path / "policies-copy"
    shutil.copytree(POLICIES_DIR, copy)
    default = yaml.safe_load((copy / "default.yaml").read_text())
    default["review"]["reviewers"] = 2
    (copy / "default.yaml").write_text(yaml.safe_dump(default))
    edited = Instance(settings.model_copy(update={"policies_dir": copy}))
    try:
        with edited.system_context() as ctx:
            added = sync_shipped_policies(ctx)
            assert [(p.name, p.version, p.status) for p in added] == [("default", 2, PENDING)]
            assert resolve_policy(ctx.session, "default").version == 1, "an edited file took effect unapproved"
        with edited.system_context() as ctx:
            assert sync_shipped_policies(ctx) == [], "syncing twice added another version"
    finally:
        edited.close()
    assert stored(instance)["default@2"] == PENDING
