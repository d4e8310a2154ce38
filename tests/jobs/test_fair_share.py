"""Fair share: the org with the fewest running jobs is served first; each org's jobs stay in order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sandbox.worker import fair_order

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def job(job_id: str, org: str, minute: int) -> Any:
    return SimpleNamespace(id=job_id, buyer_org=org, created_at=T0 + timedelta(minutes=minute))


def test_a_flood_from_one_org_does_not_starve_another() -> None:
    queued = [job(f"a{n}", "a", n) for n in range(5)] + [job("b0", "b", 10)]
    assert [j.id for j in fair_order(queued, running=[])][:2] == ["a0", "b0"]


def test_running_jobs_count_against_their_org() -> None:
    queued = [job("a0", "a", 0), job("b0", "b", 5)]
    running = [job("ar", "a", -10)]
    assert [j.id for j in fair_order(queued, running)] == ["b0", "a0"]


def test_each_org_keeps_submission_order() -> None:
    queued = [job("a1", "a", 1), job("a0", "a", 0), job("b0", "b", 2), job("b1", "b", 3)]
    order = [j.id for j in fair_order(queued, running=[])]
    assert order.index("a0") < order.index("a1") and order.index("b0") < order.index("b1")
    assert order == ["a0", "b0", "a1", "b1"]
