"""`sandbox demo` runs the README's tour by itself: a newcomer sees a DP answer and a job reach review
without typing another command."""

from __future__ import annotations

import selectors
import subprocess
import sys
import time
from pathlib import Path

from cli.server import base_env, free_port, stop

from sandbox.config import Settings
from sandbox.instance import Instance
from sandbox.store.models import Job


def _read_until(process: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=1.0):
            line = process.stdout.readline()
            seen.append(line)
            if marker in line:
                return "".join(seen)
    raise AssertionError(f"no {marker!r} within {timeout_s} s; the demo printed:\n{''.join(seen)}")


def test_the_demo_runs_a_job_to_review_by_itself(tmp_path: Path, analysis_image: str) -> None:
    home = tmp_path / "home"
    env = {**base_env(home, None), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "demo", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = _read_until(process, "tour ended", timeout_s=300)
    finally:
        errors = stop(process)
    assert "Traceback" not in errors, errors
    assert "DP query (0.1 epsilon" in printed
    released = next(line for line in printed.splitlines() if "released to the buyer without a person" in line)
    assert "tables/count-by-embolic_protection-x-stroke_death_30d.csv" in released, printed
    assert "by_protection.csv" not in released
    job_id = next(line for line in printed.splitlines() if "submitted (" in line).split("job ", 1)[1].split()[0]
    assert f"job {job_id} is in_review" in printed

    # What the tour printed is what the store holds: the job waits for a steward, its table left by itself.
    instance = Instance(Settings(home=home))
    try:
        with instance.read_session() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state == "in_review" and job.image_id
            statuses = {output.path: output.status for output in job.outputs}
    finally:
        instance.close()
    assert statuses["by_protection.csv"] == "in_review"
    assert any(path.startswith("tables/") and status == "released" for path, status in statuses.items())
