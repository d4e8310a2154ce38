"""A service killed with SIGKILL mid-job picks the job up again on restart, and the result arrives."""

from __future__ import annotations

from pathlib import Path

import docker
import httpx
import pytest
from restarts import killed_mid_job

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SLOW_JOB = """
import time, pandas as pd
time.sleep(4)
pd.read_parquet('/data/carotid-stenting.parquet').groupby('sex').size().to_csv('/output/by_sex.csv')
print('finished after the restart')
"""


# A leader killed mid-job on PostgreSQL, and its successor adopting the job, is tests/scale/test_leader.py's.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigkill_mid_job_then_restart_delivers_the_result(tmp_path: Path, database_url: str | None,
                                                          analysis_image: str) -> None:
    with killed_mid_job(tmp_path, database_url, procedures=200,
                        contract={"tier": "aggregate", "kinds": ["analysis"], "epsilon": 1.0},
                        spec={"command": ["python3", "main.py"],
                              "resources": {"cpus": 1, "memory_mb": 512, "timeout_s": 120}},
                        code={"main.py": SLOW_JOB}, submit_s=60, finish_s=90) as run:
        job = run.job
        assert job["state"] in ("in_review", "done") and job["exit_code"] == 0, job
        assert {o["path"] for o in job["outputs"]} >= {"by_sex.csv", "logs/stdout.txt"}
        log = httpx.get(f"{run.url}/v1/reviews/{job['id']}/files/logs/stdout.txt", headers=run.steward).text
        assert "finished after the restart" in log
        assert not docker.from_env().containers.list(
            all=True, filters={"label": f"org.sandbox.instance={run.instance_label}"})
