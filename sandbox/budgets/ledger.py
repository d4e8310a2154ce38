"""The budget ledger: reserve a query's `PrivacyCost` before any noise is drawn, then commit or release it.

Every reservation locks the contract's ledger row, then the dataset's cap row, always in that
order (FOR UPDATE on PostgreSQL; SQLite transactions here already hold the write lock), so
concurrent queries serialise on the budget and cannot both fit into the same remainder.

Every figure is an exact integer of the units in `cost`, so no float sum can overspend (review 11.4).
The float columns only mirror the integers for readers that want a number.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox.budgets.cost import (
    DELTA_SCALE,
    EPSILON_SCALE,
    PrivacyCost,
    epsilon_units_up,
    shown_delta,
    shown_epsilon,
    total_units,
)
from sandbox.errors import Conflict, Invalid, NotFound
from sandbox.store.models import BudgetLedger, BudgetReservation, Contract, DatasetBudget

# Names this process in the reservations it holds; a reservation whose holder is another process
# when a process starts was left by one that died mid-query, and is released (see `release_abandoned`).
HOLDER = f"{socket.gethostname()[:24]}:{os.getpid()}:{uuid.uuid4().hex[:16]}"


class BudgetExhausted(Conflict):
    slug = "budget-exhausted"
    title = "Privacy budget exhausted"


def ensure_ledgers(session: Session, contract: Contract) -> None:
    """A ledger per dataset of the contract and a cap row per dataset (idempotent)."""
    for dataset in contract.datasets:
        exists = session.execute(select(BudgetLedger.id).where(
            BudgetLedger.contract_id == contract.id, BudgetLedger.dataset == dataset)).first()
        if not exists:
            row = BudgetLedger(contract_id=contract.id, dataset=dataset, epsilon_total=contract.epsilon,
                               delta_total=contract.delta,
                               epsilon_total_units=total_units(contract.epsilon, EPSILON_SCALE) or 0,
                               delta_total_units=total_units(contract.delta or 0.0, DELTA_SCALE) or 0,
                               epsilon_spent_units=0, epsilon_reserved_units=0, delta_spent_units=0,
                               delta_reserved_units=0)
            _mirror_ledger(row)
            session.add(row)
        ensure_dataset_budget(session, dataset)
    session.flush()


def ensure_dataset_budget(session: Session, dataset: str) -> DatasetBudget:
    budget = session.get(DatasetBudget, dataset)
    if budget is None:
        budget = DatasetBudget(dataset=dataset, epsilon_cap=None, epsilon_cap_units=None, epsilon_spent_units=0,
                               epsilon_reserved_units=0, mock_epsilon_units=0)
        _mirror_cap(budget)
        session.add(budget)
        session.flush()
    return budget


def lock(session: Session, contract_id: str, dataset: str) -> tuple[BudgetLedger, DatasetBudget]:
    """The contract's ledger row and the dataset's cap row, locked in that order."""
    ledger = session.execute(select(BudgetLedger).where(
        BudgetLedger.contract_id == contract_id, BudgetLedger.dataset == dataset).with_for_update(),
    ).scalar_one_or_none()
    if ledger is None:
        raise NotFound(f"contract {contract_id} has no budget for {dataset!r}")
    cap = lock_cap(session, dataset)
    return ledger, cap


def lock_cap(session: Session, dataset: str) -> DatasetBudget:
    return session.execute(select(DatasetBudget).where(DatasetBudget.dataset == dataset).with_for_update()).scalar_one()


def dataset_budget(session: Session, dataset: str) -> DatasetBudget:
    return session.execute(select(DatasetBudget).where(DatasetBudget.dataset == dataset)).scalar_one()


def own_remaining_units(ledger: BudgetLedger) -> int:
    """What the contract's own budget still holds (the dataset cap aside)."""
    return max(ledger.epsilon_total_units - ledger.epsilon_spent_units - ledger.epsilon_reserved_units, 0)


def remaining_epsilon(ledger: BudgetLedger) -> float:
    """What the contract's own budget still holds, as its buyer sees it (on the grid)."""
    return shown_epsilon(own_remaining_units(ledger))


def cap_remaining_units(cap: DatasetBudget) -> int | None:
    """What the dataset's cap still holds across all buyers; None when uncapped."""
    if cap.epsilon_cap_units is None:
        return None
    used = cap.epsilon_spent_units + cap.epsilon_reserved_units + cap.mock_epsilon_units
    return max(cap.epsilon_cap_units - used, 0)


def reserve(session: Session, *, contract_id: str, dataset: str, cost: PrivacyCost,
            query_key: str, holder: str = HOLDER) -> BudgetReservation:
    """Hold `cost` for one query, or raise BudgetExhausted and hold nothing.

    A DP training run holds its epsilon for as long as the job lasts, across process restarts: its
    holder is the job (`job_holder`), which `release_abandoned` leaves alone; the job settles it.
    """
    ledger, cap = lock(session, contract_id, dataset)
    own = own_remaining_units(ledger)
    if cost.epsilon_units > own:
        raise BudgetExhausted(
            f"this query needs epsilon {cost.epsilon:g} but only {shown_epsilon(own):g} remains on contract "
            f"{contract_id} for {dataset!r}; nothing was spent", epsilon_remaining=shown_epsilon(own))
    shared = cap_remaining_units(cap)
    if shared is not None and cost.epsilon_units > shared:
        # The cap's remainder is other buyers' business: the refusal says only that it binds.
        raise BudgetExhausted(f"the dataset-wide privacy budget for {dataset!r} cannot cover epsilon "
                              f"{cost.epsilon:g}; nothing was spent", epsilon_remaining=shown_epsilon(own))
    if cost.delta_units > 0 and ledger.delta_total_units == 0:
        raise BudgetExhausted(f"contract {contract_id} is pure DP (delta 0): no query may spend delta; "
                              "nothing was spent", epsilon_remaining=shown_epsilon(own))
    delta_left = ledger.delta_total_units - ledger.delta_spent_units - ledger.delta_reserved_units
    if cost.delta_units > delta_left:
        raise BudgetExhausted(f"this query needs delta {cost.delta:g} but only {shown_delta(delta_left):g} "
                              "remains; nothing was spent", epsilon_remaining=shown_epsilon(own))
    ledger.epsilon_reserved_units += cost.epsilon_units
    ledger.delta_reserved_units += cost.delta_units
    cap.epsilon_reserved_units += cost.epsilon_units
    _mirror_ledger(ledger)
    _mirror_cap(cap)
    reservation = BudgetReservation(id=uuid.uuid4().hex, ledger_id=ledger.id, epsilon=cost.epsilon,
                                    delta=cost.delta, epsilon_units=cost.epsilon_units,
                                    delta_units=cost.delta_units, state="reserved", query_key=query_key,
                                    holder=holder, created_at=datetime.now(UTC))
    session.add(reservation)
    session.flush()
    return reservation


class ReservationLost(Conflict):
    slug = "reservation-lost"
    title = "Budget reservation lost"


def settle(session: Session, reservation_id: str, *, spent: bool) -> BudgetLedger:
    """Turn a reservation into spend (the answer left) or give it back (nothing left).

    Committing a reservation that is no longer held (released at another process's startup) raises
    ReservationLost: the answer it paid for must then not leave.
    """
    reservation, ledger, cap = _locked(session, reservation_id)
    if reservation.state != "reserved":
        if spent and reservation.state != "committed":
            raise ReservationLost("the budget held for this query was released before it finished; "
                                  "nothing was spent and no answer left; ask again")
        return ledger
    return _close(session, reservation, ledger, cap, epsilon_units=reservation.epsilon_units if spent else 0,
                  delta_units=reservation.delta_units if spent else 0, committed=spent)


JOB_HOLDER_PREFIX = "job:"


def job_holder(job_id: str) -> str:
    """The holder of a reservation that belongs to a job, not to the process serving it."""
    return f"{JOB_HOLDER_PREFIX}{job_id}"


def settle_part(session: Session, reservation_id: str, *, epsilon_units: int, delta_units: int) -> BudgetLedger:
    """Spend part of a reservation (at most all of it) and give back the rest: a training run that stopped
    early, or whose accountant ended below what was held. A no-op once settled."""
    reservation, ledger, cap = _locked(session, reservation_id)
    if reservation.state != "reserved":
        return ledger
    epsilon_units = min(max(epsilon_units, 0), reservation.epsilon_units)
    delta_units = min(max(delta_units, 0), reservation.delta_units)
    return _close(session, reservation, ledger, cap, epsilon_units=epsilon_units, delta_units=delta_units,
                  committed=bool(epsilon_units or delta_units))


def _locked(session: Session, reservation_id: str) -> tuple[BudgetReservation, BudgetLedger, DatasetBudget]:
    """The reservation, then its contract's ledger and its dataset's cap, locked in the ledger's order."""
    reservation = session.execute(select(BudgetReservation).where(
        BudgetReservation.id == reservation_id).with_for_update()).scalar_one()
    ledger_row = session.get(BudgetLedger, reservation.ledger_id)
    assert ledger_row is not None
    ledger, cap = lock(session, ledger_row.contract_id, ledger_row.dataset)
    return reservation, ledger, cap


def _close(session: Session, reservation: BudgetReservation, ledger: BudgetLedger, cap: DatasetBudget, *,
           epsilon_units: int, delta_units: int, committed: bool) -> BudgetLedger:
    """Release what `reservation` held and spend the given part of it."""
    ledger.epsilon_reserved_units -= reservation.epsilon_units
    ledger.delta_reserved_units -= reservation.delta_units
    cap.epsilon_reserved_units -= reservation.epsilon_units
    ledger.epsilon_spent_units += epsilon_units
    ledger.delta_spent_units += delta_units
    cap.epsilon_spent_units += epsilon_units
    _mirror_ledger(ledger)
    _mirror_cap(cap)
    reservation.state = "committed" if committed else "released"
    session.flush()
    return ledger


def release_abandoned(session: Session, *, holder: str = HOLDER) -> int:
    """Release every reservation still held by a process other than `holder`; how many there were.

    Called when a process starts: a reservation of a process that was killed mid-query would
    otherwise hold budget for ever. One that belongs to a live peer is released too; that peer's
    settle then raises ReservationLost, so its answer never leaves unpaid.
    """
    ids = list(session.execute(select(BudgetReservation.id).where(
        BudgetReservation.state == "reserved", BudgetReservation.holder != holder,
        BudgetReservation.holder.not_like(f"{JOB_HOLDER_PREFIX}%"))).scalars())
    for reservation_id in ids:
        settle(session, reservation_id, spent=False)
    return len(ids)


def add_mock_spend(session: Session, dataset: str, epsilon: float) -> DatasetBudget:
    """Charge a DP mock's epsilon (rounded up) to the dataset's cap, or raise BudgetExhausted."""
    cap = lock_cap(session, dataset)
    units = epsilon_units_up(epsilon)
    left = cap_remaining_units(cap)
    if left is not None and units > left:
        raise BudgetExhausted(f"publishing this mock needs epsilon {epsilon:g} but the dataset's cap leaves "
                              f"{left / EPSILON_SCALE:g}; nothing was spent")
    cap.mock_epsilon_units += units
    _mirror_cap(cap)
    session.flush()
    return cap


def refund_mock_spend(session: Session, dataset: str, epsilon: float) -> None:
    cap = lock_cap(session, dataset)
    cap.mock_epsilon_units -= epsilon_units_up(epsilon)
    _mirror_cap(cap)
    session.flush()


def set_cap(session: Session, dataset: str, epsilon_cap: float | None) -> DatasetBudget:
    """A steward's cap on the dataset; refused below what is already spent or held."""
    ensure_dataset_budget(session, dataset)
    cap = lock_cap(session, dataset)
    units = total_units(epsilon_cap, EPSILON_SCALE)
    used = cap.epsilon_spent_units + cap.epsilon_reserved_units + cap.mock_epsilon_units
    if units is not None and units < used:
        raise Invalid(f"the cap {epsilon_cap:g} is below what {dataset!r} has already spent")
    cap.epsilon_cap_units = units
    _mirror_cap(cap)
    session.flush()
    return cap


def budget_view(ledger: BudgetLedger, cap: DatasetBudget, *, steward: bool) -> dict[str, object]:
    """One ledger as its reader may see it: a buyer only its own contract's figures, on the grid.

    The dataset-wide figures sum every buyer's spend, so only stewards see them (review 11.7).
    """
    view: dict[str, object] = {
        "contract": ledger.contract_id,
        "dataset": ledger.dataset,
        "epsilon_total": shown_epsilon(ledger.epsilon_total_units),
        "epsilon_spent": shown_epsilon(ledger.epsilon_spent_units),
        "epsilon_reserved": shown_epsilon(ledger.epsilon_reserved_units),
        "epsilon_remaining": remaining_epsilon(ledger),
        "delta_total": shown_delta(ledger.delta_total_units),
        "delta_spent": shown_delta(ledger.delta_spent_units),
        # The cap is a steward's setting, not anyone's spend: it moves with no buyer's queries.
        "dataset_epsilon_cap": cap.epsilon_cap_units / EPSILON_SCALE if cap.epsilon_cap_units is not None else None,
    }
    if steward:
        shared = cap_remaining_units(cap)
        view["dataset_epsilon_spent"] = (cap.epsilon_spent_units + cap.mock_epsilon_units) / EPSILON_SCALE
        view["dataset_epsilon_remaining"] = shared / EPSILON_SCALE if shared is not None else None
    return view


def _mirror_ledger(ledger: BudgetLedger) -> None:
    ledger.epsilon_spent = ledger.epsilon_spent_units / EPSILON_SCALE
    ledger.epsilon_reserved = ledger.epsilon_reserved_units / EPSILON_SCALE
    ledger.delta_spent = ledger.delta_spent_units / DELTA_SCALE
    ledger.delta_reserved = ledger.delta_reserved_units / DELTA_SCALE


def _mirror_cap(cap: DatasetBudget) -> None:
    cap.epsilon_cap = cap.epsilon_cap_units / EPSILON_SCALE if cap.epsilon_cap_units is not None else None
    cap.epsilon_spent = cap.epsilon_spent_units / EPSILON_SCALE
    cap.epsilon_reserved = cap.epsilon_reserved_units / EPSILON_SCALE
    cap.mock_epsilon = cap.mock_epsilon_units / EPSILON_SCALE
