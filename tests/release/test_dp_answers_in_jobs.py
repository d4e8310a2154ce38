"""DP answers a job received leave as the platform recorded them: values the engine released, under
the plan's column names, never the SQL text or the aliases the job's code wrote."""

from __future__ import annotations

import json

import pytest
from helpers import auth
from jobworld import JobWorld

pytestmark = pytest.mark.docker

JOB = """
import pandas as pd
from sandbox_client import dp
row = pd.read_parquet('/data/carotid-stenting.parquet').iloc[0]
alias = f"{row.patient_id}_{row.sex}_{row.age}"
dp.query(f'SELECT sex, COUNT(*) AS "{alias}" FROM "carotid-stenting" WHERE age >= {int(row.age)} GROUP BY sex',
         epsilon=0.1)
open('/output/dp_result.json', 'w').write('{"kind": "dp_result", "rows": [["' + alias + '", 1]]}')
"""


def test_a_jobs_dp_answer_leaves_without_its_aliases_and_a_forged_one_waits(job_world: JobWorld) -> None:
    w = job_world
    contract = w.api.post("/v1/contracts", headers=auth(w.steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis", "query"],
        "purpose": "dp in an aggregate job", "valid_until": "2099-01-01", "epsilon": 1.0}).json()
    created = w.submit({"main.py": JOB}, ["python3", "main.py"], contract=contract["id"])
    job = w.run_until(created["id"], {"in_review", "failed", "done"})
    assert job["exit_code"] == 0, w.review_text(created["id"], "logs/stderr.txt")
    outputs = {o["path"]: o for o in w.job(created["id"], token=w.buyer)["outputs"] if o["path"]}
    assert outputs["dp/answer-001.json"]["status"] == "released"
    answer = w.api.get(f"/v1/jobs/{created['id']}/outputs/dp/answer-001.json", headers=auth(w.buyer))
    body = json.loads(answer.text)
    assert body["columns"] == ["sex", "count"] and len(body["rows"]) == 2
    assert "_F_" not in answer.text and "_M_" not in answer.text and "SELECT" not in answer.text, answer.text
    assert "dp_result.json" not in outputs, "a dp_result file the job wrote itself was released or named"
