"""Which audited events carry which metered quantity, and a period's quantities from them: pure.

Every quantity on an invoice is read from the audit chain, never from a mutable row:

| item        | event                    | detail            | meaning                                      |
|-------------|--------------------------|-------------------|----------------------------------------------|
| cpu seconds | `job.usage`              | `cpu_seconds`     | the job's running total (the worker's figure) |
| gpu seconds | `job.usage`              | `gpu_seconds`     | the job's running total                      |
| cpu seconds | `notebook.kernel.usage`  | `cpu_seconds`     | one notebook kernel's use, added once        |
| epsilon     | `dp.query`               | `epsilon`         | charged for one answered DP query            |
| epsilon     | `training.budget.settle` | `epsilon_charged` | charged when a DP training run settled       |
| bytes       | `job.outputs.checked`    | `bytes_released`  | the outputs the checks released at once      |
| bytes       | `job.output.release`     | `bytes_released`  | a file a steward's review released           |
| bytes       | `notebook.table`, `notebook.export` | `size` | when its `status` is `released`           |

A running total counts in a period as the job's last total in the period minus its last total before
it, so recording the same total again (a restarted worker) adds nothing, and a job's use is never
counted twice across months. Every other event is counted once, in the period it was recorded in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sandbox.billing.prices import Period

CPU_SECONDS = "cpu_seconds"
GPU_SECONDS = "gpu_seconds"
EPSILON = "epsilon"
BYTES_RELEASED = "bytes_released"

# action -> (quantity, detail) pairs of events counted once each.
ADDED: dict[str, tuple[tuple[str, str], ...]] = {
    "notebook.kernel.usage": ((CPU_SECONDS, "cpu_seconds"),),
    "dp.query": ((EPSILON, "epsilon"),),
    "training.budget.settle": ((EPSILON, "epsilon_charged"),),
    "job.outputs.checked": ((BYTES_RELEASED, "bytes_released"),),
    "job.output.release": ((BYTES_RELEASED, "bytes_released"),),
}
# Notebook outputs the platform released on the spot carry their size and status.
RELEASED_ON_THE_SPOT = ("notebook.table", "notebook.export")
# action -> (quantity, detail) pairs of a job's running totals.
RUNNING_TOTALS: dict[str, tuple[tuple[str, str], ...]] = {
    "job.usage": ((CPU_SECONDS, "cpu_seconds"), (GPU_SECONDS, "gpu_seconds")),
}
METERED_ACTIONS = (*ADDED, *RELEASED_ON_THE_SPOT, *RUNNING_TOTALS)


@dataclass(frozen=True)
class MeterEvent:
    """An audited event, as metering reads it; `job` is the job it is about (for running totals)."""

    seq: int
    at: datetime
    action: str
    job: str | None
    details: dict[str, Any]
    # The data-holder org the event's quantity is owed to when it is one org's alone (a DP query on its
    # dataset, a training run's epsilon on its ledger); None: the job's orgs share it (`split_by_org`).
    org: str | None = None


@dataclass
class Metered:
    """One quantity in a period: its amount in base units and the events it came from."""

    quantity: Decimal = Decimal(0)
    events: list[int] = field(default_factory=list)


def _number(value: Any) -> Decimal:
    """A detail as an exact decimal; what is not a finite number counts as nothing."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return Decimal(0)
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        return Decimal(0)
    return number if number.is_finite() else Decimal(0)


def added_quantities(event: MeterEvent) -> list[tuple[str, Decimal]]:
    """What one counted-once event adds, per quantity."""
    if event.action in RELEASED_ON_THE_SPOT:
        if event.details.get("status") != "released":
            return []
        return [(BYTES_RELEASED, _number(event.details.get("size")))]
    return [(quantity, _number(event.details[detail])) for quantity, detail in ADDED.get(event.action, ())
            if detail in event.details]


def meter(events: Iterable[MeterEvent], period: Period) -> dict[str, Metered]:
    """The quantities (seconds, epsilon, bytes) of one contract's events in `period`.

    `events` are the contract's metered events up to the period's end, in `seq` order (earlier ones give
    the running totals their starting point).
    """
    metered: dict[str, Metered] = {}
    before: dict[tuple[str, str], Decimal] = {}  # (job, quantity) -> last running total before the period
    last: dict[tuple[str, str], tuple[int, Decimal]] = {}  # -> (seq, total) of its last event in the period
    for event in events:
        if event.at >= period.end:
            continue
        inside = event.at >= period.start
        if event.action in RUNNING_TOTALS:
            if event.job is None:
                continue
            for quantity, detail in RUNNING_TOTALS[event.action]:
                if detail in event.details:
                    key = (event.job, quantity)
                    if inside:
                        last[key] = (event.seq, _number(event.details[detail]))
                    else:
                        before[key] = _number(event.details[detail])
            continue
        if not inside:
            continue
        for quantity, amount in added_quantities(event):
            if not amount:
                continue
            entry = metered.setdefault(quantity, Metered())
            entry.quantity += amount
            entry.events.append(event.seq)
    for (job, quantity), (seq, running_total) in last.items():
        used = running_total - before.get((job, quantity), Decimal(0))
        if used:
            entry = metered.setdefault(quantity, Metered())
            entry.quantity += used
            entry.events.append(seq)
    for entry in metered.values():
        entry.events.sort()
    return metered


# Details that carry a metered amount; a shared event's are scaled to each org's share.
_AMOUNTS = ("cpu_seconds", "gpu_seconds", "epsilon", "epsilon_charged", "bytes_released", "size")


def split_by_org(events: Iterable[MeterEvent], *, job_orgs: dict[str, list[str]], owner: str) -> dict[
        str, list[MeterEvent]]:
    """One contract's events as each data-holder org's share (issue 17): an event that is one org's
    (`MeterEvent.org`) goes to it whole; a job's events are split equally among the orgs whose data the job
    read (`job_orgs`); anything else (a notebook of an older contract, say) is the contract owner's.

    Running totals split the same way, so each org's period figure is its share of the job's. Pure."""
    shares: dict[str, list[MeterEvent]] = {}
    for event in events:
        if event.org is not None:
            orgs = [event.org]
        elif event.job is not None and job_orgs.get(event.job):
            orgs = job_orgs[event.job]
        else:
            orgs = [owner]
        for org in orgs:
            shares.setdefault(org, []).append(event if len(orgs) == 1 else _scaled(event, len(orgs)))
    return shares


def _scaled(event: MeterEvent, parts: int) -> MeterEvent:
    details = {key: (str(_number(value) / parts) if key in _AMOUNTS else value) for key, value in event.details.items()}
    return MeterEvent(seq=event.seq, at=event.at, action=event.action, job=event.job, details=details, org=event.org)
