"""`sandbox demo` runs the README's tour by itself: a newcomer sees a DP answer and a job reach review
without typing another command."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cli.server import base_env, free_port, stop

from sandbox.auth.tokens import Principal, Role
from sandbox.billing.invoices import invoices
from sandbox.config import Settings
from sandbox.demo_setup import HOSPITAL_ORG
from sandbox.dp.queries import budgets
from sandbox.instance import Instance
from sandbox.jobs import service
from sandbox.store.models import Job


def _read_until(process: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """Lines the process prints up to the one holding `marker`. A thread reads them: a selector on the
    pipe would miss lines that one read already pulled into the text buffer (two lines printed together)."""
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    stdout = process.stdout

    def pump() -> None:
        try:
            for line in stdout:
                lines.put(line)
        except (ValueError, OSError):  # the pipe closed under it when the test stopped the process
            pass
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
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
        invoice, usage, spent = demo_invoice(instance, job)
    finally:
        instance.close()
    assert statuses["by_protection.csv"] == "in_review"
    assert any(path.startswith("tables/") and status == "released" for path, status in statuses.items())

    # The demo contract's invoice is its metered usage, priced: the epsilon its ledger spent, its jobs' CPU
    # (billed per started second) and the bytes released, each line traced to audit events.
    lines = {line["item"]: line for line in invoice["lines"]}
    assert Decimal(lines["epsilon"]["quantity"]) == pytest.approx(Decimal(str(spent)), abs=Decimal("1e-6"))
    assert Decimal(lines["epsilon"]["amount"]) == (Decimal(str(spent)) * 100).quantize(Decimal("0.01"))
    assert lines["epsilon"]["events"], "the epsilon line names no audit event"
    cpu = Decimal(lines["cpu_hours"]["quantity"])
    assert Decimal(str(usage["cpu_hours"])) - Decimal("1e-6") <= cpu <= Decimal(str(usage["cpu_hours"])) + \
        Decimal(1) / 3600 + Decimal("1e-6")
    assert Decimal(lines["released_gb"]["quantity"]) == pytest.approx(
        Decimal(usage["bytes_released"]) / 10**9, abs=Decimal("1e-6"))
    assert (lines["flat_fee"]["quantity"], lines["flat_fee"]["amount"]) == ("1.000000", "500.00")
    assert Decimal(invoice["total"]) == sum(Decimal(line["amount"]) for line in invoice["lines"])


def demo_invoice(instance: Instance, job: Job) -> tuple[dict[str, Any], dict[str, Any], float]:
    """The demo contract's invoice for the job's month, its usage report and the epsilon its ledgers spent,
    as the hospital's steward sees them."""
    steward = Principal(sub="auditing-steward", org=HOSPITAL_ORG, role=Role.STEWARD, jti="demo-check",
                        issuer="test", expires_at=datetime.now(UTC) + timedelta(hours=1))
    with instance.read_context(steward) as ctx:
        [invoice] = [i for i in invoices(ctx, period=job.created_at.strftime("%Y-%m"))
                     if i["contract"] == job.contract_id]
        usage = next(u for u in service.usage_report(ctx) if u["contract"] == job.contract_id)
    spent = sum(float(str(b["epsilon_spent"])) for b in budgets(instance, steward) if b["contract"] == job.contract_id)
    return invoice, usage, spent
