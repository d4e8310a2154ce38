"""Metering from audit events: running totals count once across periods and restarts; the rest once each."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sandbox.billing.meters import BYTES_RELEASED, CPU_SECONDS, EPSILON, GPU_SECONDS, MeterEvent, meter
from sandbox.billing.prices import Period

JANUARY, FEBRUARY = Period(2027, 1), Period(2027, 2)


def event(seq: int, day: tuple[int, int], action: str, job: str | None = None, **details: Any) -> MeterEvent:
    return MeterEvent(seq=seq, at=datetime(2027, day[0], day[1], 12, tzinfo=UTC), action=action, job=job,
                      details=details)


def test_a_running_total_recorded_twice_counts_once() -> None:
    events = [event(1, (1, 5), "job.usage", "j-1", cpu_seconds=10.5, gpu_seconds=4.0),
              event(2, (1, 5), "job.usage", "j-1", cpu_seconds=10.5, gpu_seconds=4.0),  # a restarted worker
              event(3, (1, 6), "job.usage", "j-2", cpu_seconds=0.25)]
    metered = meter(events, JANUARY)
    assert metered[CPU_SECONDS].quantity == Decimal("10.75"), "a repeated running total was counted twice"
    assert metered[CPU_SECONDS].events == [2, 3]
    assert metered[GPU_SECONDS].quantity == Decimal("4.0") and metered[GPU_SECONDS].events == [2]


def test_a_running_total_counts_in_each_month_only_what_it_grew_by() -> None:
    events = [event(1, (1, 31), "job.usage", "j-1", cpu_seconds=100.0),
              event(2, (2, 1), "job.usage", "j-1", cpu_seconds=150.0),
              event(3, (2, 2), "job.usage", "j-2", cpu_seconds=7.0)]
    assert meter(events, JANUARY)[CPU_SECONDS].quantity == Decimal(100)
    february = meter(events, FEBRUARY)
    assert february[CPU_SECONDS].quantity == Decimal(57), "January's use was billed again in February"
    assert february[CPU_SECONDS].events == [2, 3]
    # The same total recorded again in March adds nothing to March.
    again = [*events, event(4, (3, 1), "job.usage", "j-1", cpu_seconds=150.0)]
    assert meter(again, Period(2027, 3)) == {}


def test_added_events_count_once_in_their_month() -> None:
    events = [event(1, (1, 3), "dp.query", epsilon=0.5, contract="c-1"),
              event(2, (1, 4), "dp.query", epsilon=0.25, contract="c-1"),
              event(3, (2, 4), "dp.query", epsilon=1.0, contract="c-1"),
              event(4, (1, 5), "training.budget.settle", "j-3", epsilon_charged=0.125, whole=False),
              event(5, (1, 6), "notebook.kernel.usage", "j-4", kernel="k", cpu_seconds=2.5, wall_seconds=9.0)]
    january = meter(events, JANUARY)
    assert january[EPSILON].quantity == Decimal("0.875") and january[EPSILON].events == [1, 2, 4]
    assert january[CPU_SECONDS].quantity == Decimal("2.5")
    assert meter(events, FEBRUARY)[EPSILON].quantity == Decimal("1.0")


def test_only_released_bytes_count() -> None:
    events = [event(1, (1, 3), "job.outputs.checked", "j-1", outputs={}, bytes_released=300),
              event(2, (1, 4), "job.output.release", "j-1", path="a.csv", status="in_review"),  # one of two votes
              event(3, (1, 4), "job.output.release", "j-1", path="a.csv", status="released", bytes_released=50),
              event(4, (1, 4), "job.output.reject", "j-1", path="b.csv", status="blocked"),
              event(5, (1, 5), "notebook.table", "j-2", size=70, status="released"),
              event(6, (1, 5), "notebook.table", "j-2", size=999, status="in_review"),
              event(7, (1, 5), "notebook.export", "j-2", size=999, status="in_review"),
              event(8, (1, 5), "job.outputs.checked", "j-9", outputs={})]  # from before bytes were audited
    metered = meter(events, JANUARY)
    assert metered[BYTES_RELEASED].quantity == Decimal(420)
    assert metered[BYTES_RELEASED].events == [1, 3, 5]


def test_hostile_details_count_as_nothing() -> None:
    events = [event(1, (1, 3), "dp.query", epsilon="NaN"), event(2, (1, 3), "dp.query", epsilon=True),
              event(3, (1, 3), "dp.query", epsilon=[1]), event(4, (1, 3), "dp.query", epsilon="Infinity"),
              event(5, (1, 3), "job.usage", None, cpu_seconds=5.0)]  # a running total needs its job
    assert meter(events, JANUARY) == {}
