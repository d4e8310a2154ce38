"""The README's tour, run by `sandbox demo` against its own server, so a newcomer sees every flow at once.

It speaks only HTTP, through the SDK a buyer and a steward use: the catalog, a DP query, a job sent to
the data that goes through the checks to review, the steward's review queue and the buyer's release
report. A job waits in the queue until the worker has the Docker engine and the job image (the demo
builds them in the background where it can); the tour says so and keeps waiting.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from sandbox.client import ApiError, SandboxClient
from sandbox.demo import DATASET_NAME
from sandbox.release.verify import pack_code

JOB_CODE = '''\
from sandbox_client import tables
df = tables.read("/data/carotid-stenting.parquet")
# A table the platform recomputes, checks and writes itself: back without a steward.
tables.crosstab(df, index="embolic_protection", columns="stroke_death_30d", path="/output/outcomes.csv")
# The job's own bytes: a steward reads them first.
df.groupby("embolic_protection")["length_of_stay"].median().to_csv("/output/by_protection.csv")
print("procedures:", len(df))
'''
QUERY = ('SELECT embolic_protection, COUNT(*) AS n FROM "carotid-stenting" GROUP BY embolic_protection')
SETTLED = {"in_review", "done", "failed", "rejected", "cancelled"}

Say = Callable[[str], None]


def wait_for_api(url: str, *, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the service at {url} did not answer within {timeout_s:.0f} s")


def run_tour(url: str, tokens: dict[str, str], contract: str, say: Say, *, job_wait_s: float = 3600.0,
             poll_s: float = 5.0) -> dict[str, Any]:
    """Every step of the tour; returns what it saw (the job's final view among it)."""
    wait_for_api(url)
    seen: dict[str, Any] = {}
    with SandboxClient(url, tokens["buyer"]) as buyer, SandboxClient(url, tokens["steward"]) as steward:
        datasets = buyer.list_datasets()
        say(f"buyer sees {len(datasets)} dataset(s) in the catalog: {', '.join(d['name'] for d in datasets)}")
        try:
            answer = buyer.query(contract, DATASET_NAME, QUERY, epsilon=0.1)
        except ApiError as error:
            say(f"DP query refused: {error}")
        else:
            seen["query"] = answer
            cells = ", ".join(f"{row[0]}={row[1]:.0f}" for row in answer["rows"])
            say(f"DP query ({answer['epsilon_spent']} epsilon, {answer['epsilon_remaining']} left): {cells}")
        job = _submit(buyer, contract)
        say(f"job {job['id']} submitted ({job['state']}); it runs once the worker has Docker and the job image")
        final = _follow(buyer, job["id"], say, deadline=time.monotonic() + job_wait_s, poll_s=poll_s)
        seen["job"] = final
        if final["state"] not in SETTLED:
            say(f"job {final['id']} is still {final['state']}; it goes on once the worker can run it")
            return seen
        say(f"job {final['id']} is {final['state']}")
        waiting = [review for review in steward.reviews() if review.get("id") == final["id"]]
        if waiting:
            files = [o["path"] for o in waiting[0].get("outputs", []) if o.get("status") == "in_review"]
            say(f"the steward's review queue holds {final['id']}: {', '.join(files)}")
        report = buyer.job_report(final["id"])
        seen["report"] = report
        released = [entry["path"] for entry in report["released"]]
        say(f"released to the buyer without a person: {', '.join(released) or 'nothing yet'}; "
            f"{report['withheld']} file(s) wait for the steward")
    say("tour ended: the README's tour goes on from here with the same tokens")
    return seen


def _submit(buyer: SandboxClient, contract: str) -> Any:
    with tempfile.TemporaryDirectory(prefix="sandbox-tour-") as folder:
        code = Path(folder) / "analysis"
        code.mkdir()
        (code / "main.py").write_text(JOB_CODE)
        bundle = Path(folder) / "code.tar.gz"
        bundle.write_bytes(pack_code(code))
        spec = {"contract": contract, "dataset": DATASET_NAME, "kind": "analysis", "image": "analysis",
                "command": ["python3", "main.py"],
                "resources": {"cpus": 1.0, "memory_mb": 1024, "timeout_s": 600, "gpus": 0}}
        return buyer.submit_job(spec, bundle)


def _follow(buyer: SandboxClient, job_id: str, say: Say, *, deadline: float, poll_s: float) -> Any:
    job = buyer.job(job_id)
    told = job["state"]
    while job["state"] not in SETTLED and time.monotonic() < deadline:
        job = buyer.job(job_id, wait_s=poll_s, since=job["state"])
        if job["state"] != told:
            say(f"job {job_id}: {job['state']}")
            told = job["state"]
    return job
