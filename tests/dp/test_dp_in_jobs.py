"""DP from inside the sandbox: dp_only jobs see the mock at /data and query the real rows through
/run/sandbox/dp.sock, under the same rules and the same ledger as the API."""

from __future__ import annotations

import pytest
from helpers import auth
from jobworld import JobWorld

pytestmark = pytest.mark.docker

JOB = """
import json, pandas as pd
from sandbox_client import dp
df = pd.read_parquet('/data/carotid-stenting.parquet')
answer = dp.query('SELECT sex, COUNT(*) AS n FROM "carotid-stenting" GROUP BY sex', epsilon=0.4)
try:
    dp.query('SELECT patient_id FROM "carotid-stenting"', epsilon=0.1)
    refused = "no"
except dp.DpError as exc:
    refused = str(exc.status)
try:
    dp.query('SELECT COUNT(*) FROM "carotid-stenting" WHERE age > 70', epsilon=5)
    over = "no"
except dp.DpError as exc:
    over = str(exc.status)
print(json.dumps({"ids": sorted(df.patient_id.unique().tolist())[:3], "rows": len(df),
                  "answer": answer.rows, "remaining": answer.epsilon_remaining, "refused": refused, "over": over}))
"""


def test_dp_only_job_sees_the_mock_and_queries_through_the_socket(job_world: JobWorld) -> None:
    w = job_world
    steward = auth(w.steward)
    assert w.api.post("/v1/datasets/carotid-stenting/versions/1/mock", headers=steward,
                      json={"epsilon": 1.0}).status_code == 201
    contract = w.api.post("/v1/contracts", headers=steward, json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "dp_only", "kinds": ["analysis", "query"],
        "purpose": "dp in jobs", "valid_until": "2099-01-01", "epsilon": 1.0, "policy": "dp-only"}).json()
    created = w.submit({"main.py": JOB}, ["python3", "main.py"], contract=contract["id"])
    job = w.run_until(created["id"], {"in_review", "failed", "done"})
    import json

    stdout = w.review_text(created["id"], "logs/stdout.txt")
    report = json.loads(stdout.strip().splitlines()[-1])
    assert all(i.startswith("M") for i in report["ids"]), f"the dp_only job saw real ids {report['ids']}"
    assert report["refused"] == "422" and report["over"] == "409", report
    assert report["remaining"] == pytest.approx(0.6)
    budgets = w.api.get("/v1/budgets", headers=auth(w.buyer)).json()
    [ledger] = [b for b in budgets if b["contract"] == contract["id"]]
    assert ledger["epsilon_spent"] == pytest.approx(0.4), "the job's query was not charged to its contract"
    events = w.api.get("/v1/audit", params={"action": "dp.query"}, headers=steward).json()
    assert any(e["details"].get("via") == f"job:{created['id']}" for e in events)
    assert job["exit_code"] == 0
    # The platform's own record of the answer leaves by itself, under the plan's column names.
    [recorded] = [o for o in w.job(created["id"], token=w.buyer)["outputs"] if o["path"] == "dp/answer-001.json"]
    assert recorded["status"] == "released" and recorded["origin"] == "platform"
    body = w.api.get(f"/v1/jobs/{created['id']}/outputs/dp/answer-001.json", headers=auth(w.buyer)).json()
    assert body["columns"] == ["sex", "count"] and body["rows"] == report["answer"]


def test_jobs_without_query_rights_have_no_socket(job_world: JobWorld) -> None:
    w = job_world
    code = "import os\nprint(os.path.exists('/run/sandbox/dp.sock'))\n"
    created = w.submit({"main.py": code}, ["python3", "main.py"])
    w.run_until(created["id"], {"in_review", "done"})
    assert w.review_text(created["id"], "logs/stdout.txt").strip() == "False"
