"""The budget ledger: reserve before any noise is drawn, then commit or release. Never overspend.

Every reservation locks the contract's ledger row, then the dataset's cap row, always in that
order (FOR UPDATE on PostgreSQL; SQLite transactions here already hold the write lock), so
concurrent queries serialise on the budget and cannot both fit into the same remainder.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox.errors import Conflict, NotFound
from sandbox.store.models import BudgetLedger, BudgetReservation, Contract, DatasetBudget

# Float sums of equal shares (0.1 + 0.1 + 0.1) overshoot by an ulp; budgets are compared with this slack.
SLACK = 1e-9


class BudgetExhausted(Conflict):
    slug = "budget-exhausted"
    title = "Privacy budget exhausted"


@dataclass(frozen=True)
class Charge:
    epsilon: float
    delta: float = 0.0


def ensure_ledgers(session: Session, contract: Contract) -> None:
    """A ledger per dataset of the contract and a cap row per dataset (idempotent)."""
    for dataset in contract.datasets:
        exists = session.execute(select(BudgetLedger.id).where(
            BudgetLedger.contract_id == contract.id, BudgetLedger.dataset == dataset)).first()
        if not exists:
            session.add(BudgetLedger(contract_id=contract.id, dataset=dataset, epsilon_total=contract.epsilon,
                                     delta_total=contract.delta, epsilon_spent=0.0, epsilon_reserved=0.0,
                                     delta_spent=0.0, delta_reserved=0.0))
        ensure_dataset_budget(session, dataset)
    session.flush()


def ensure_dataset_budget(session: Session, dataset: str) -> DatasetBudget:
    budget = session.get(DatasetBudget, dataset)
    if budget is None:
        budget = DatasetBudget(dataset=dataset, epsilon_cap=None, epsilon_spent=0.0, epsilon_reserved=0.0,
                               mock_epsilon=0.0)
        session.add(budget)
        session.flush()
    return budget


def _locked(session: Session, contract_id: str, dataset: str) -> tuple[BudgetLedger, DatasetBudget]:
    ledger = session.execute(select(BudgetLedger).where(
        BudgetLedger.contract_id == contract_id, BudgetLedger.dataset == dataset).with_for_update(),
    ).scalar_one_or_none()
    if ledger is None:
        raise NotFound(f"contract {contract_id} has no budget for {dataset!r}")
    cap = session.execute(select(DatasetBudget).where(DatasetBudget.dataset == dataset).with_for_update()).scalar_one()
    return ledger, cap


def dataset_budget(session: Session, dataset: str) -> DatasetBudget:
    return session.execute(select(DatasetBudget).where(DatasetBudget.dataset == dataset)).scalar_one()


def remaining(ledger: BudgetLedger, cap: DatasetBudget) -> float:
    """What the contract can still spend on the dataset, the global cap included."""
    own = ledger.epsilon_total - ledger.epsilon_spent - ledger.epsilon_reserved
    if cap.epsilon_cap is not None:
        own = min(own, cap.epsilon_cap - cap.epsilon_spent - cap.epsilon_reserved - cap.mock_epsilon)
    return max(own, 0.0)


def reserve(session: Session, *, contract_id: str, dataset: str, charge: Charge, query_key: str) -> BudgetReservation:
    """Hold `charge` for one query, or raise BudgetExhausted and hold nothing."""
    ledger, cap = _locked(session, contract_id, dataset)
    left = remaining(ledger, cap)
    if charge.epsilon > left + SLACK:
        raise BudgetExhausted(
            f"this query needs epsilon {charge.epsilon:g} but only {left:g} remains on contract {contract_id} "
            f"for {dataset!r}; nothing was spent", epsilon_remaining=left)
    delta_left = ledger.delta_total - ledger.delta_spent - ledger.delta_reserved
    if charge.delta > delta_left + SLACK:
        raise BudgetExhausted(f"this query needs delta {charge.delta:g} but only {max(delta_left, 0):g} remains; "
                              "nothing was spent", epsilon_remaining=left)
    ledger.epsilon_reserved += charge.epsilon
    ledger.delta_reserved += charge.delta
    cap.epsilon_reserved += charge.epsilon
    reservation = BudgetReservation(id=uuid.uuid4().hex, ledger_id=ledger.id, epsilon=charge.epsilon,
                                    delta=charge.delta, state="reserved", query_key=query_key,
                                    created_at=datetime.now(UTC))
    session.add(reservation)
    session.flush()
    return reservation


def settle(session: Session, reservation_id: str, *, spent: bool) -> BudgetLedger:
    """Turn a reservation into spend (the answer left) or give it back (nothing left)."""
    reservation = session.execute(select(BudgetReservation).where(
        BudgetReservation.id == reservation_id).with_for_update()).scalar_one()
    ledger_row = session.get(BudgetLedger, reservation.ledger_id)
    assert ledger_row is not None
    ledger, cap = _locked(session, ledger_row.contract_id, ledger_row.dataset)
    if reservation.state != "reserved":
        return ledger
    ledger.epsilon_reserved -= reservation.epsilon
    ledger.delta_reserved -= reservation.delta
    cap.epsilon_reserved -= reservation.epsilon
    if spent:
        ledger.epsilon_spent += reservation.epsilon
        ledger.delta_spent += reservation.delta
        cap.epsilon_spent += reservation.epsilon
    reservation.state = "committed" if spent else "released"
    session.flush()
    return ledger


def budget_view(ledger: BudgetLedger, cap: DatasetBudget) -> dict[str, object]:
    return {
        "contract": ledger.contract_id,
        "dataset": ledger.dataset,
        "epsilon_total": ledger.epsilon_total,
        "epsilon_spent": round(ledger.epsilon_spent, 12),
        "epsilon_reserved": round(ledger.epsilon_reserved, 12),
        "epsilon_remaining": round(remaining(ledger, cap), 12),
        "delta_total": ledger.delta_total,
        "delta_spent": ledger.delta_spent,
        "dataset_epsilon_cap": cap.epsilon_cap,
        "dataset_epsilon_spent": round(cap.epsilon_spent + cap.mock_epsilon, 12),
    }
