"""Jobs end to end: API submission, the real worker and Docker, review, signed release."""

from __future__ import annotations

import hashlib

import pytest
from helpers import auth
from jobworld import JobWorld

from sandbox.release.verify import verify_manifest

pytestmark = pytest.mark.docker

ANALYSIS = """
import duckdb, pandas as pd, matplotlib.pyplot as plt
df = pd.read_parquet('/data/carotid-stenting.parquet')
table = duckdb.sql("SELECT symptomatic, avg(length_of_stay) AS mean_stay FROM df GROUP BY 1 ORDER BY 1").df()
table.to_csv('/output/summary.csv', index=False)
plt.hist(df.age, bins=10); plt.savefig('/output/ages.png')
print('rows', len(df))
"""


def test_analysis_runs_is_reviewed_released_and_downloaded(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": ANALYSIS}, ["python3", "main.py"])
    assert created["state"] == "queued" and created["image_id"].startswith("sha256:")
    job = w.run_until(created["id"], {"in_review", "done", "failed"})
    assert job["state"] == "in_review" and job["exit_code"] == 0, job
    outputs = {o["path"]: o for o in job["outputs"]}
    assert set(outputs) == {"summary.csv", "ages.png", "logs/stdout.txt", "logs/stderr.txt"}
    # The job's own table and figure, and its printed log, go to a person in the aggregate tier; an empty
    # log says nothing and leaves.
    assert outputs["summary.csv"]["status"] == "in_review"
    assert outputs["ages.png"]["status"] == "in_review"
    assert outputs["logs/stdout.txt"]["status"] == "in_review" and "logs" in outputs["logs/stdout.txt"]["rules"]
    assert outputs["logs/stderr.txt"]["status"] == "released"

    buyer = auth(w.buyer)
    assert w.api.get(f"/v1/jobs/{job['id']}/outputs/summary.csv", headers=buyer).status_code == 404
    assert w.api.get(f"/v1/jobs/{job['id']}/outputs/ages.png", headers=buyer).status_code == 404
    assert "rows 300" not in w.api.get(f"/v1/jobs/{job['id']}/logs", headers=buyer).text

    decided = w.api.post(f"/v1/reviews/{job['id']}/decisions", headers=auth(w.steward), json={
        "release": ["summary.csv", "logs/stdout.txt"], "reject": ["ages.png"], "comment": "aggregate only"})
    assert decided.status_code == 200, decided.text
    assert decided.json()["state"] == "done"

    content = w.api.get(f"/v1/jobs/{job['id']}/outputs/summary.csv", headers=buyer)
    assert content.status_code == 200 and content.text.startswith("symptomatic,mean_stay")
    assert "rows 300" in w.api.get(f"/v1/jobs/{job['id']}/logs", headers=buyer).text
    assert w.api.get(f"/v1/jobs/{job['id']}/outputs/ages.png", headers=buyer).status_code == 404, "rejected figure"
    signed = w.api.get(f"/v1/jobs/{job['id']}/manifest", headers=buyer).json()
    manifest = verify_manifest(signed, w.instance.settings.verify_key_path.read_bytes())
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert listed == {"summary.csv": hashlib.sha256(content.content).hexdigest(),
                      "logs/stdout.txt": outputs["logs/stdout.txt"]["sha256"],
                      "logs/stderr.txt": hashlib.sha256(b"").hexdigest()}
    tampered = {**signed, "manifest": {**signed["manifest"], "files": []}}
    with pytest.raises(Exception, match="does not verify"):
        verify_manifest(tampered, w.instance.settings.verify_key_path.read_bytes())

    final = w.job(created["id"])
    assert final["usage"]["wall_seconds"] > 0
    assert final["usage"]["bytes_released"] == outputs["summary.csv"]["size"] + outputs["logs/stdout.txt"]["size"]
    usage = w.api.get("/v1/usage", headers=buyer).json()
    assert usage[0]["jobs"] == 1 and usage[0]["bytes_released"] > 0
    events = [e["action"] for e in w.api.get("/v1/audit", params={"limit": 500}, headers=auth(w.steward)).json()]
    for action in ("job.submit", "job.running", "job.checking", "job.in_review", "job.output.release",
                   "job.output.reject", "job.done", "job.output.download"):
        assert action in events, f"{action} was not audited"
    assert not w.containers(), "the finished job's container was not removed"


def test_a_failing_job_reports_its_exit_code(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": "import sys; print('boom'); sys.exit(3)"}, ["python3", "main.py"])
    job = w.run_until(created["id"], {"failed", "in_review"})
    # The steward sees the exact code; the buyer sees that it failed, and its printed log waits for a steward.
    assert job["state"] == "in_review" and job["exit_code"] == 3 and job["reason"] == "exit code 3"
    buyer = w.job(created["id"], token=w.buyer)
    assert buyer["exit_code"] == 1 and buyer["reason"] == "the job exited with an error"
    assert "boom" not in w.api.get(f"/v1/jobs/{created['id']}/logs", headers=auth(w.buyer)).text
    decided = w.api.post(f"/v1/reviews/{created['id']}/decisions", headers=auth(w.steward),
                         json={"release": ["logs/stdout.txt"], "reject": [], "comment": "debug output"})
    assert decided.status_code == 200 and decided.json()["state"] == "failed", decided.text
    assert "boom" in w.api.get(f"/v1/jobs/{created['id']}/logs", headers=auth(w.buyer)).text


def test_cancel_a_running_job_stops_its_container(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": "import time; time.sleep(600)"}, ["python3", "main.py"])
    w.run_until(created["id"], {"running"})
    assert w.containers(), "the job's container did not start"
    cancelled = w.api.post(f"/v1/jobs/{created['id']}/cancel", headers=auth(w.buyer))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    w.worker.tick()
    assert not w.containers(), "a cancelled job's container kept running"
    again = w.api.post(f"/v1/jobs/{created['id']}/cancel", headers=auth(w.buyer))
    assert again.status_code == 409


def test_a_vanished_container_fails_the_job(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": "import time; time.sleep(600)"}, ["python3", "main.py"])
    w.run_until(created["id"], {"running"})
    for container in w.containers():
        container.remove(force=True)
    job = w.run_until(created["id"], {"failed"})
    assert "vanished" in job["reason"]


def test_unknown_containers_are_removed(job_world: JobWorld, analysis_image: str) -> None:
    import docker

    from runners.base import LABEL_JOB, LABEL_MANAGED

    client = docker.from_env()
    client.containers.create(analysis_image, ["sleep", "600"], name="sandbox-job-j-stray0000000000",
                             labels={LABEL_MANAGED: "1", LABEL_JOB: "j-stray0000000000",
                                     "org.sandbox.instance": job_world.instance.instance_id},
                             network_mode="none")
    assert job_world.containers()
    job_world.worker.tick()
    assert not job_world.containers(), "a container unknown to the store survived reconciliation"


def test_concurrency_cap_holds_the_second_job(job_world: JobWorld) -> None:
    w = job_world
    steward = auth(w.steward)
    capped = w.api.post("/v1/contracts", headers=steward, json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
        "purpose": "cap", "valid_until": "2099-01-01", "epsilon": 1.0, "quotas": {"concurrent_jobs": 1}}).json()
    first = w.submit({"main.py": "import time; time.sleep(600)"}, ["python3", "main.py"], contract=capped["id"])
    second = w.submit({"main.py": "print(1)"}, ["python3", "main.py"], contract=capped["id"])
    w.worker.tick()
    assert w.job(first["id"])["state"] == "running" and w.job(second["id"])["state"] == "queued"
    w.api.post(f"/v1/jobs/{first['id']}/cancel", headers=auth(w.buyer))
    w.run_until(second["id"], {"in_review", "done"})


@pytest.mark.parametrize(("change", "expect", "needle"), [
    ({"resources": {"cpus": 64}}, 422, "cpus"),
    ({"resources": {"memory_mb": 10_000_000}}, 422, "memory_mb"),
    ({"resources": {"timeout_s": 999_999}}, 422, "timeout_s"),
    ({"resources": {"gpus": 1}}, 422, "GPU hours"),
    ({"image": "notebook"}, 422, "not available"),
    ({"kind": "training"}, 403, "does not allow training"),
    ({"contract": "c-doesnotexist"}, 404, "does not exist"),
    ({"command": []}, 422, "command"),
    ({"extra": 1}, 422, "extra"),
])
def test_spec_is_validated_before_anything_runs(job_world: JobWorld, change: dict[str, object], expect: int,
                                                needle: str) -> None:
    import json

    from jobworld import pack

    spec = {"contract": job_world.contract, "dataset": "carotid-stenting", "image": "analysis",
            "command": ["python3", "main.py"], **change}
    response = job_world.api.post("/v1/jobs", headers=auth(job_world.buyer), data={"spec": json.dumps(spec)},
                                  files={"code": ("c.tar.gz", pack({"main.py": "print(1)"}), "application/gzip")})
    assert response.status_code == expect, response.text
    assert needle in response.text
    assert not job_world.api.get("/v1/jobs", headers=auth(job_world.buyer)).json(), "a refused job was stored"


def test_revoked_contract_stops_submission_and_queued_jobs(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": "print(1)"}, ["python3", "main.py"])
    w.api.post(f"/v1/contracts/{w.contract}/revoke", headers=auth(w.steward), json={"reason": "test"})
    w.worker.tick()
    job = w.job(created["id"])
    assert job["state"] == "cancelled" and "revoked" in job["reason"]
    refused = w.submit({"main.py": "print(1)"}, ["python3", "main.py"], expect=403)
    assert "revoked" in refused["detail"]


def test_another_org_cannot_see_or_cancel_a_job(job_world: JobWorld, tokens) -> None:  # type: ignore[no-untyped-def]
    w = job_world
    created = w.submit({"main.py": "print(1)"}, ["python3", "main.py"])
    other = auth(tokens.buyer(org="rival"))
    assert w.api.get(f"/v1/jobs/{created['id']}", headers=other).status_code == 404
    assert w.api.post(f"/v1/jobs/{created['id']}/cancel", headers=other).status_code == 404
    assert w.api.get("/v1/jobs", headers=other).json() == []


def test_strict_policy_needs_approval_first(job_world: JobWorld) -> None:
    w = job_world
    strict = w.api.post("/v1/contracts", headers=auth(w.steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "trusted", "kinds": ["analysis"],
        "purpose": "strict", "valid_until": "2099-01-01", "epsilon": 1.0, "policy": "strict"}).json()
    created = w.submit({"main.py": "print(1)"}, ["python3", "main.py"], contract=strict["id"])
    assert created["state"] == "pending_approval"
    w.worker.tick()
    assert w.job(created["id"])["state"] == "pending_approval", "an unapproved job ran"
    assert w.api.post(f"/v1/jobs/{created['id']}/approve", headers=auth(w.buyer)).status_code == 403
    approved = w.api.post(f"/v1/jobs/{created['id']}/approve", headers=auth(w.steward), json={"comment": "ok"})
    assert approved.json()["state"] == "queued"
    w.run_until(created["id"], {"in_review"})


def test_cpu_hour_quota_stops_a_running_job_and_refuses_new_ones(job_world: JobWorld) -> None:
    w = job_world
    tight = w.api.post("/v1/contracts", headers=auth(w.steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
        "purpose": "quota", "valid_until": "2099-01-01", "epsilon": 1.0,
        "quotas": {"cpu_hours": 0.0003}}).json()  # about one CPU-second
    burner = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"
    created = w.submit({"main.py": burner}, ["python3", "main.py"], contract=tight["id"])
    job = w.run_until(created["id"], {"cancelled", "in_review", "failed"}, timeout=60)
    assert job["state"] == "cancelled" and job["reason"].startswith("quota"), job
    assert job["usage"]["cpu_seconds"] > 1.0
    w.worker.tick()
    assert not w.containers(), "a job over its CPU quota kept running"
    refused = w.submit({"main.py": "print(1)"}, ["python3", "main.py"], contract=tight["id"], expect=403)
    assert "CPU-hours" in refused["detail"]
