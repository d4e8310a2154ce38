"""Two-person review: different stewards, never the submitter's org, reset when a file changes."""

from __future__ import annotations

import pytest
from helpers import Tokens, auth
from jobworld import JobWorld
from sqlalchemy import update

from sandbox.store.models import JobOutput

pytestmark = pytest.mark.docker

# Counts that meet every rule of the strict policy (>= 10, multiples of 5), and a mean table that no
# check can verify without provenance: both wait for people.
CODE = "open('/output/summary.csv', 'w').write('group,n\\na,15\\nb,20\\n')\nprint('done')\n"
MEANS = "open('/output/summary.csv', 'w').write('group,mean\\na,12.5\\nb,15.25\\n')\nprint('done')\n"


def test_strict_policy_needs_two_different_stewards(job_world: JobWorld, tokens: Tokens) -> None:
    w = job_world
    strict = w.api.post("/v1/contracts", headers=auth(w.steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "trusted", "kinds": ["analysis"],
        "purpose": "two-person", "valid_until": "2099-01-01", "epsilon": 1.0, "policy": "strict"}).json()
    created = w.submit({"main.py": CODE}, ["python3", "main.py"], contract=strict["id"])
    w.api.post(f"/v1/jobs/{created['id']}/approve", headers=auth(w.steward))
    w.run_until(created["id"], {"in_review"})
    first, second, third = (auth(tokens.steward(sub=name, org="hospital")) for name in ("ana", "ben", "cai"))
    decisions = f"/v1/reviews/{created['id']}/decisions"

    assert w.api.post(decisions, headers=first, json={"release": ["summary.csv"]}).status_code == 200
    report = w.api.get(f"/v1/jobs/{created['id']}/report", headers=auth(w.steward)).json()
    [waiting] = [e for e in report["in_review"] if e["path"] == "summary.csv"]
    assert waiting["approvals"] == 1 and waiting["needed"] == 2, "one steward's release let the file out"
    assert w.api.get(f"/v1/jobs/{created['id']}/outputs/summary.csv", headers=auth(w.buyer)).status_code == 404
    again = w.api.post(decisions, headers=first, json={"release": ["summary.csv"]})
    assert again.status_code == 409 and "different steward" in again.json()["detail"]
    own_org = w.api.post(decisions, headers=auth(tokens.steward(sub="mole", org="acme")),
                         json={"release": ["summary.csv"]})
    assert own_org.status_code == 403, "a steward of the buyer's org reviewed its output"

    # The file changes under review (re-collected with new content): earlier approvals no longer count.
    with w.instance.sessions() as session, session.begin():
        session.execute(update(JobOutput).where(JobOutput.job_id == created["id"], JobOutput.path == "summary.csv")
                        .values(sha256="f" * 64))
    assert w.api.post(decisions, headers=second, json={"release": ["summary.csv"]}).status_code == 200
    report = w.api.get(f"/v1/jobs/{created['id']}/report", headers=auth(w.steward)).json()
    [waiting] = [e for e in report["in_review"] if e["path"] == "summary.csv"]
    assert waiting["approvals"] == 1, "a review of the old content counted for the changed file"
    assert w.api.post(decisions, headers=third, json={"release": ["summary.csv"]}).status_code == 200
    w.api.post(decisions, headers=first, json={"reject": ["logs/stdout.txt"], "comment": "not needed"})
    report = w.api.get(f"/v1/jobs/{created['id']}/report", headers=auth(w.buyer)).json()
    assert [e["path"] for e in report["released"]] == ["summary.csv"]
    assert not report["blocked"] and report["withheld"] == 2, "the buyer saw a file it did not get"
    blocked = {e["path"]: e for e in w.api.get(f"/v1/jobs/{created['id']}/report", headers=auth(w.steward)).json()[
        "blocked"]}
    assert blocked["logs/stdout.txt"]["rules"] == ["rejected-in-review"]


def test_default_policy_releases_after_one_review(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": MEANS}, ["python3", "main.py"])
    w.run_until(created["id"], {"in_review"})
    decided = w.api.post(f"/v1/reviews/{created['id']}/decisions", headers=auth(w.steward),
                         json={"release": ["summary.csv", "logs/stdout.txt"]})
    assert decided.json()["state"] == "done"
    report = w.api.get(f"/v1/jobs/{created['id']}/report", headers=auth(w.buyer)).json()
    assert {e["path"] for e in report["released"]} == {"summary.csv", "logs/stdout.txt", "logs/stderr.txt"}
