"""Each hospital's share of a contract's metered events (issue 17): pure, no store."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from sandbox.billing.meters import CPU_SECONDS, EPSILON, MeterEvent, meter, split_by_org
from sandbox.billing.prices import parse_period

MONTH = parse_period("2027-03", now=datetime(2027, 3, 15, tzinfo=UTC))


def event(seq: int, action: str, job: str | None, org: str | None = None, **details: object) -> MeterEvent:
    return MeterEvent(seq=seq, at=datetime(2027, 3, 1 + seq, tzinfo=UTC), action=action, job=job,
                      details=dict(details), org=org)


def test_compute_splits_equally_and_epsilon_goes_to_its_dataset_holder() -> None:
    events = [
        event(1, "job.usage", "j-both", cpu_seconds=9.0),
        event(2, "job.usage", "j-both", cpu_seconds=30.0),  # a running total: 30 in all
        event(3, "job.usage", "j-north", cpu_seconds=4.0),
        event(4, "dp.query", None, org="south", epsilon=0.25),
        event(5, "training.budget.settle", "j-both", org="north", epsilon_charged=0.5),
        event(6, "training.budget.settle", "j-both", org="south", epsilon_charged=0.5),
        event(7, "job.usage", "j-old", cpu_seconds=6.0),  # an older job: its contract owner's
    ]
    shares = split_by_org(events, job_orgs={"j-both": ["north", "south", "west"], "j-north": ["north"]},
                          owner="north")
    metered = {org: meter(found, MONTH) for org, found in shares.items()}
    assert metered["north"][CPU_SECONDS].quantity == Decimal(10) + 4 + 6
    assert metered["south"][CPU_SECONDS].quantity == Decimal(10)
    assert metered["west"][CPU_SECONDS].quantity == Decimal(10)
    assert metered["north"][EPSILON].quantity == Decimal("0.5")
    assert metered["south"][EPSILON].quantity == Decimal("0.75")
    assert EPSILON not in metered["west"], "an org whose dataset paid no epsilon was billed some"
    total = sum(m[CPU_SECONDS].quantity for m in metered.values())
    assert abs(total - Decimal(40)) < Decimal("1e-20"), "the shares do not add up to the whole"
