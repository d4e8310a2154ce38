"""Stewards are bound to their org (review 11.10): another org's datasets, contracts, policies, jobs and
outputs are 404 to them, a buyer org's own stewards never decide its jobs, and two-person rules count
two stewards of the owning org. Each attack is a real call on a real service with real tokens.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card, register_demo
from sqlalchemy import select

from sandbox.config import REPO_ROOT
from sandbox.instance import Instance
from sandbox.policies import sync_shipped_policies
from sandbox.store.models import Job, JobOutput, OutputReview

DATASET = "carotid-stenting"


@dataclass
class Orgs:
    """A hospital that holds the data, a second hospital ('clinic'), and buyer org acme with a steward of its own."""

    api: TestClient
    instance: Instance
    tokens: Tokens
    ana: dict[str, str]  # steward of the hospital
    ben: dict[str, str]  # a second steward of the hospital
    clinic: dict[str, str]  # steward of another hospital
    mole: dict[str, str]  # steward of the buyer org itself
    buyer: dict[str, str]
    contract: str  # hospital -> acme, strict policy (two reviewers, approval of jobs)

    def job(self, *, state: str, outputs: dict[str, str] | None = None) -> str:
        """A job of acme under the hospital's contract, stored as the worker leaves it, with files."""
        identifier = f"j-{uuid.uuid4().hex[:16]}"
        now = datetime.now(UTC)
        with self.instance.sessions() as session, session.begin():
            session.add(Job(id=identifier, contract_id=self.contract, buyer_org="acme", submitted_by="buyer-acme",
                            dataset=DATASET, dataset_version=1, kind="analysis", tier="trusted", policy="strict@1",
                            image="analysis", image_id="sha256:" + "0" * 64, command=["true"], resources={},
                            code_sha256="0" * 64, code_bytes=0, state=state, reason="", exit_code=0, usage={},
                            created_at=now, updated_at=now))
            session.flush()
            for path, content in (outputs or {}).items():
                stored = self.instance.settings.artifacts_dir / "jobs" / identifier / "outputs" / path
                stored.parent.mkdir(parents=True, exist_ok=True)
                stored.write_text(content)
                session.add(JobOutput(job_id=identifier, path=path, size=len(content),
                                      sha256=hashlib.sha256(content.encode()).hexdigest(), kind="table",
                                      verdict="review", checks=[], status="in_review", origin="buyer",
                                      stored_path=str(stored.relative_to(self.instance.settings.artifacts_dir))))
        return identifier


@pytest.fixture
def orgs(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path) -> Iterator[Orgs]:
    ana = tokens.steward("ana", org="hospital")
    register_demo(api, ana, tmp_path)
    created = api.post("/v1/contracts", headers=auth(ana), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "trusted", "kinds": ["analysis", "query"],
        "purpose": "tenancy", "valid_until": "2099-01-01", "epsilon": 1.0, "policy": "strict"})
    assert created.status_code == 201, created.text
    yield Orgs(api=api, instance=instance, tokens=tokens, ana=auth(ana),
               ben=auth(tokens.steward("ben", org="hospital")), clinic=auth(tokens.steward("carl", org="clinic")),
               mole=auth(tokens.steward("mole", org="acme")), buyer=auth(tokens.buyer(org="acme")),
               contract=created.json()["id"])


def _status(response: httpx.Response, expected: int, what: str) -> Any:
    assert response.status_code == expected, f"{what}: {response.status_code} {response.text[:300]}"
    return response.json() if response.headers.get("content-type", "").endswith("json") else None


def test_a_contract_names_only_the_creating_stewards_own_datasets(orgs: Orgs) -> None:
    body = {"buyer_org": "acme", "datasets": [DATASET], "tier": "trusted", "kinds": ["analysis"],
            "purpose": "x", "valid_until": "2099-01-01", "epsilon": 100}
    foreign = _status(orgs.api.post("/v1/contracts", headers=orgs.clinic, json=body), 422,
                      "another hospital's steward granted a contract on the hospital's dataset alone")
    missing = _status(orgs.api.post("/v1/contracts", headers=orgs.clinic, json={**body, "datasets": ["nope"]}), 422,
                      "a contract on a missing dataset")
    assert len(foreign["errors"]) == 1 and "own org (clinic)" in foreign["errors"][0], foreign
    assert missing["errors"] == ["dataset 'nope' does not exist"], missing
    # The review's attack: the buyer org's own steward gives its org a trusted contract with epsilon 100.
    _status(orgs.api.post("/v1/contracts", headers=orgs.mole, json=body), 403,
            "the buyer org's steward granted its own org a contract")
    _status(orgs.api.post("/v1/contracts", headers=orgs.ana, json={**body, "buyer_org": "hospital"}), 403,
            "the data holder's steward granted a contract to their own org")
    _status(orgs.api.post("/v1/datasets", headers=orgs.clinic, json=demo_card("clinic-data")), 201, "clinic data")
    # Another org's dataset beside its own makes that org a party that must consent (issue 17,
    # tests/parties): the contract exists but grants nothing of the clinic's until then.
    both = {**body, "datasets": [DATASET, "clinic-data"]}
    mixed = _status(orgs.api.post("/v1/contracts", headers=orgs.ana, json=both), 201,
                    "a contract naming another org's dataset beside its own")
    assert [(p["org"], p["consented_at"] is None) for p in mixed["parties"]] == [("clinic", True),
                                                                               ("hospital", False)], mixed
    granted = _status(orgs.api.post("/v1/contracts", headers=orgs.clinic, json={**body, "datasets": ["clinic-data"]}),
                      201, "the clinic's own contract")
    assert granted["owner_org"] == "clinic"


def test_another_orgs_contracts_are_404_to_a_steward(orgs: Orgs) -> None:
    contract = f"/v1/contracts/{orgs.contract}"
    _status(orgs.api.get(contract, headers=orgs.clinic), 404, "another hospital's steward read the contract")
    _status(orgs.api.post(f"{contract}/revoke", headers=orgs.clinic, json={}), 404,
            "another hospital's steward revoked the contract")
    listed = _status(orgs.api.get("/v1/contracts", headers=orgs.clinic), 200, "list")
    assert orgs.contract not in [c["id"] for c in listed], "another org's contract is in a steward's list"
    usage = _status(orgs.api.get("/v1/usage", headers=orgs.clinic), 200, "usage")
    assert orgs.contract not in [u["contract"] for u in usage], "another org's usage is in a steward's report"
    budgets = _status(orgs.api.get("/v1/budgets", headers=orgs.clinic), 200, "budgets")
    assert orgs.contract not in [b["contract"] for b in budgets], "another org's ledger is in a steward's budgets"
    own = _status(orgs.api.get(contract, headers=orgs.ben), 200, "a steward of the owning org")
    assert own["owner_org"] == "hospital"
    assert orgs.contract in [b["contract"] for b in orgs.api.get("/v1/budgets", headers=orgs.ben).json()]
    _status(orgs.api.post(f"{contract}/revoke", headers=orgs.ben, json={}), 200, "the owning org's revocation")


def test_another_orgs_steward_gets_the_buyers_catalog_and_writes_nothing(orgs: Orgs, tmp_path: Path) -> None:
    buyer_view = _status(orgs.api.get(f"/v1/datasets/{DATASET}", headers=orgs.buyer), 200, "buyer view")
    owner_view = _status(orgs.api.get(f"/v1/datasets/{DATASET}", headers=orgs.ana), 200, "owner view")
    assert "sha256" in owner_view["versions"][0], "the owning steward lost the digests"
    for who, headers in (("another hospital's steward", orgs.clinic), ("the buyer org's steward", orgs.mole)):
        seen = _status(orgs.api.get(f"/v1/datasets/{DATASET}", headers=headers), 200, who)
        assert seen == buyer_view, f"{who} saw more than a buyer: {seen}"
        [listed] = [d for d in _status(orgs.api.get("/v1/datasets", headers=headers), 200, who) if d["name"] == DATASET]
        assert listed == buyer_view, f"{who} saw digests, row counts or hidden bounds in the catalog: {listed}"
    [listed] = [d for d in orgs.api.get("/v1/datasets", headers=orgs.ben).json() if d["name"] == DATASET]
    assert listed == owner_view, "a steward of the owning org lost the steward's view of the listing"

    upload = tmp_path / "v2.csv"
    upload.write_text("x\n1\n")
    with upload.open("rb") as handle:
        _status(orgs.api.post(f"/v1/datasets/{DATASET}/versions", headers=orgs.clinic,
                              files={"file": ("v2.csv", handle)}), 404, "another org's steward uploaded a version")
    _status(orgs.api.post(f"/v1/datasets/{DATASET}/budget-cap", headers=orgs.clinic, json={"epsilon_cap": 1000}),
            404, "another org's steward moved the dataset cap")
    _status(orgs.api.post(f"/v1/datasets/{DATASET}/versions/1/mock", headers=orgs.clinic, json={"epsilon": 1}),
            404, "another org's steward published (and paid for) a mock")
    _status(orgs.api.get(f"/v1/datasets/{DATASET}/versions/1/mock", headers=orgs.clinic), 404,
            "another org's steward downloaded the mock")
    _status(orgs.api.post(f"/v1/datasets/{DATASET}/budget-cap", headers=orgs.ben, json={"epsilon_cap": 50}), 200,
            "the owning org's steward set the cap")


def test_job_approvals_and_reviews_belong_to_the_data_holders_stewards(orgs: Orgs) -> None:
    pending = orgs.job(state="pending_approval")
    for who, headers in (("another hospital's steward", orgs.clinic),):
        _status(orgs.api.get(f"/v1/jobs/{pending}", headers=headers), 404, f"{who} read the job")
        assert pending not in [j["id"] for j in orgs.api.get("/v1/jobs", headers=headers).json()]
        _status(orgs.api.post(f"/v1/jobs/{pending}/approve", headers=headers, json={}), 404, f"{who} approved")
    _status(orgs.api.post(f"/v1/jobs/{pending}/approve", headers=orgs.mole, json={}), 403,
            "a steward of the buyer's own org approved its job")
    _status(orgs.api.post(f"/v1/jobs/{pending}/reject", headers=orgs.mole, json={}), 403,
            "a steward of the buyer's own org rejected its job")
    assert _status(orgs.api.post(f"/v1/jobs/{pending}/approve", headers=orgs.ana, json={}), 200,
                   "the data holder's steward")["state"] == "queued"

    waiting = orgs.job(state="in_review", outputs={"summary.csv": "group,n\na,15\n"})
    review_file = f"/v1/reviews/{waiting}/files/summary.csv"
    decisions = f"/v1/reviews/{waiting}/decisions"
    _status(orgs.api.get(review_file, headers=orgs.clinic), 404, "another hospital read an unreleased output")
    _status(orgs.api.get(f"/v1/jobs/{waiting}/outputs/summary.csv", headers=orgs.clinic), 404,
            "another hospital downloaded an output")
    _status(orgs.api.post(decisions, headers=orgs.clinic, json={"release": ["summary.csv"]}), 404,
            "another hospital released an output")
    _status(orgs.api.get(review_file, headers=orgs.mole), 403, "the buyer org's steward read its unreleased output")
    _status(orgs.api.post(decisions, headers=orgs.mole, json={"release": ["summary.csv"]}), 403,
            "the buyer org's steward released its own output")
    for who, headers in (("another hospital", orgs.clinic), ("the buyer org", orgs.mole)):
        queue = _status(orgs.api.get("/v1/reviews", headers=headers), 200, who)
        assert waiting not in [j["id"] for j in queue], f"{who}'s steward sees the job in the review queue"
    assert waiting in [j["id"] for j in orgs.api.get("/v1/reviews", headers=orgs.ana).json()]
    assert orgs.api.get(review_file, headers=orgs.ana).text == "group,n\na,15\n"


def test_two_person_review_counts_two_stewards_of_the_owning_org(orgs: Orgs) -> None:
    waiting = orgs.job(state="in_review", outputs={"summary.csv": "group,n\na,15\n"})
    decisions = f"/v1/reviews/{waiting}/decisions"
    # A release by another org's steward, as the store held them before review 11.10, never counts.
    with orgs.instance.sessions() as session, session.begin():
        output = session.execute(select(JobOutput).where(JobOutput.job_id == waiting)).scalar_one()
        session.add(OutputReview(output_id=output.id, steward="carl", org="clinic", decision="release",
                                 sha256=output.sha256, comment="", at=datetime.now(UTC)))
    first = _status(orgs.api.post(decisions, headers=orgs.ana, json={"release": ["summary.csv"]}), 200, "ana")
    [entry] = [o for o in first["outputs"] if o["path"] == "summary.csv"]
    assert entry["status"] == "in_review", "another org's steward counted as the second reviewer"
    report = orgs.api.get(f"/v1/jobs/{waiting}/report", headers=orgs.ana).json()
    assert [(e["approvals"], e["needed"]) for e in report["in_review"]] == [(1, 2)], report
    second = _status(orgs.api.post(decisions, headers=orgs.ben, json={"release": ["summary.csv"]}), 200, "ben")
    [entry] = [o for o in second["outputs"] if o["path"] == "summary.csv"]
    assert entry["status"] == "released", "two stewards of the owning org did not release the file"


def test_policy_versions_belong_to_the_proposing_org(orgs: Orgs, tmp_path: Path) -> None:
    body = orgs.api.get("/v1/policies/default/versions/1", headers=orgs.ana).json()["body"]
    weaker = {**body, "runtime": {**body["runtime"], "max_cpus": body["runtime"]["max_cpus"] + 60}}
    proposed = _status(orgs.api.post("/v1/policies", json=weaker, headers=orgs.ana), 201, "proposal")
    ref, version = proposed["ref"], proposed["version"]
    assert proposed["owner_org"] == "hospital"
    # The review's attack: a steward of another hospital approves as the second steward.
    for verb in ("approve", "reject"):
        _status(orgs.api.post(f"/v1/policies/default/versions/{version}/{verb}", headers=orgs.clinic, json={}),
                404, f"another hospital's steward could {verb} {ref}")
    _status(orgs.api.get(f"/v1/policies/default/versions/{version}", headers=orgs.clinic), 404,
            "another hospital read the proposal")
    assert ref not in [p["ref"] for p in orgs.api.get("/v1/policies", headers=orgs.clinic).json()]
    _status(orgs.api.post(f"/v1/policies/default/versions/{version}/approve", headers=orgs.ben, json={}), 200,
            "the owning org's second steward")

    # The approved weakening binds only the org that made it.
    register_demo(orgs.api, orgs.clinic["Authorization"].removeprefix("Bearer "), tmp_path, name="clinic-data")
    clinic_contract = {"buyer_org": "acme", "datasets": ["clinic-data"], "tier": "aggregate", "kinds": ["analysis"],
                       "purpose": "x", "valid_until": "2099-01-01", "epsilon": 1.0}
    pinned = _status(orgs.api.post("/v1/contracts", headers=orgs.clinic, json=clinic_contract), 201, "clinic")
    assert pinned["policy"] == "default@1", f"another org's approved policy bound the clinic: {pinned['policy']}"
    _status(orgs.api.post("/v1/contracts", headers=orgs.clinic, json={**clinic_contract, "policy": ref}), 422,
            "the clinic pinned the hospital's policy version")
    hospital = _status(orgs.api.post("/v1/contracts", headers=orgs.ana, json={
        **clinic_contract, "datasets": [DATASET]}), 201, "hospital")
    assert hospital["policy"] == ref, "the owning org's approved version was not pinned"
    # The buyer reads the version its contract pins, the other hospital still does not.
    _status(orgs.api.get(f"/v1/policies/default/versions/{version}", headers=orgs.buyer), 200, "buyer")


def test_a_steward_reads_only_their_own_orgs_audit_events(orgs: Orgs) -> None:
    orgs.api.get(f"/v1/contracts/{orgs.contract}", headers=orgs.buyer)  # acme's read of the hospital's contract
    _status(orgs.api.post("/v1/datasets", headers=orgs.clinic, json=demo_card("clinic-data")), 201, "clinic data")
    hospital_objects = {DATASET, f"{DATASET}@1", orgs.contract}
    seen_by_clinic = _status(orgs.api.get("/v1/audit?limit=1000", headers=orgs.clinic), 200, "clinic audit")
    leaked = [e for e in seen_by_clinic if e["object_id"] in hospital_objects or e["org"] in ("hospital", "acme")]
    assert not leaked, f"another hospital's steward read the hospital's audit events: {leaked[:3]}"
    assert "clinic-data" in {e["object_id"] for e in seen_by_clinic}, "a steward lost their own org's events"
    seen_by_owner = _status(orgs.api.get("/v1/audit?limit=1000", headers=orgs.ben), 200, "hospital audit")
    pairs = {(e["action"], e["object_id"], e["org"]) for e in seen_by_owner}
    assert ("contract.read", orgs.contract, "acme") in pairs, "the owner does not see a buyer's use of its contract"
    assert ("dataset.version.add", f"{DATASET}@1", "hospital") in pairs
    assert not [e for e in seen_by_owner if e["object_id"] == "clinic-data"], "the hospital read the clinic's events"
    everything = _status(orgs.api.get("/v1/audit?limit=1000", headers=auth(orgs.tokens.auditor())), 200, "auditor")
    assert {e["object_id"] for e in everything} >= hospital_objects | {"clinic-data"}, "the auditor lost events"


# Bodies that pass validation, so the answer is about the object, not the body.
BODIES: dict[str, dict[str, Any]] = {
    "/v1/reviews/{job_id}/decisions": {"release": ["summary.csv"]},
    "/v1/datasets/{name}/budget-cap": {"epsilon_cap": 1.0},
    "/v1/datasets/{name}/versions/{version}/mock": {"epsilon": 1.0},
    "/v1/notebooks/{identifier}/exports": {"path": "x.csv"},
    "/v1/datasets/{name}/versions/{version}/remediate": {"drop": ["age"]},
    "/v1/datasets/{name}/versions/{version}/override": {"reason": "a reason long enough to pass"},
}
# Routes whose object is public to every signed-in caller: an org's version-signing public key.
PUBLIC = {("GET", "/v1/datasets/{name}"), ("GET", "/v1/orgs/{org}/keys")}


def test_every_route_naming_another_orgs_object_is_404_to_a_steward(orgs: Orgs) -> None:
    """The class, not the listed examples: each /v1 route with an object in its path, called by a steward
    of another hospital on the hospital's objects, answers 404 (the catalog card: the buyer's view)."""
    job = orgs.job(state="in_review", outputs={"summary.csv": "group,n\na,15\n"})
    body = orgs.api.get("/v1/policies/default/versions/1", headers=orgs.ana).json()["body"]
    proposed = orgs.api.post("/v1/policies", headers=orgs.ana, json={**body, "description": "hospital's own"}).json()
    values = {"job_id": job, "identifier": job, "contract_id": orgs.contract, "name": DATASET, "version": "1",
              "path": "summary.csv", "org": "hospital"}
    policy_values = {"name": "default", "version": str(proposed["version"])}
    checked, failures = 0, []
    # The OpenAPI schema lists every /v1 route (tests/auth/test_roles.py checks it against the routes).
    for template, operations in orgs.api.app.openapi()["paths"].items():  # type: ignore[attr-defined]
        if not template.startswith("/v1/") or "{" not in template or template.startswith("/v1/tokens/"):
            continue  # tokens are the admin's, not an org's
        url = template
        for key, value in {**values, **(policy_values if template.startswith("/v1/policies/") else {})}.items():
            url = url.replace("{" + key + "}", value)
        for method in sorted(m.upper() for m in operations):
            response = orgs.api.request(method, url, headers=orgs.clinic, json=BODIES.get(template, {}))
            if response.status_code == 403 and "may not call this" in response.text:
                continue  # a role the route refuses to every steward: not an org question
            checked += 1
            expected = 200 if (method, template) in PUBLIC else 404
            if response.status_code != expected:
                failures.append(f"{method} {template}: {response.status_code} {response.text[:120]}")
    assert checked >= 20, f"only {checked} routes were probed"
    assert not failures, "another org's steward got further than a 404:\n" + "\n".join(failures)


def test_an_orgs_version_does_not_stand_in_for_a_shipped_change(orgs: Orgs, tmp_path: Path) -> None:
    """An operator's edit of a shipped file becomes a global pending version even when one org already
    has a version with that content: that version binds only its own org."""
    body = orgs.api.get("/v1/policies/default/versions/1", headers=orgs.ana).json()["body"]
    edited = {**body, "description": "operator's edit"}
    assert orgs.api.post("/v1/policies", headers=orgs.ana, json=edited).status_code == 201
    copy = tmp_path / "policies-copy"
    shutil.copytree(REPO_ROOT / "policies", copy)
    (copy / "default.yaml").write_text(yaml.safe_dump(edited))
    reloaded = Instance(orgs.instance.settings.model_copy(update={"policies_dir": copy}))
    try:
        with reloaded.system_context() as ctx:
            added = sync_shipped_policies(ctx)
            assert [(p.name, p.owner_org, p.status) for p in added] == [("default", None, "pending")], \
                "the operator's change was taken for the hospital's version"
    finally:
        reloaded.close()
