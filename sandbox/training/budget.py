"""A DP training run's epsilon on the contract's ledger: held when the job is accepted, settled when it ends.

The same ledger as DP queries, so training and queries share one budget and concurrent use never
overspends. The reservation belongs to the job, not to a process: it survives restarts of the API and
the worker, and only the job's end settles it. What is charged then:
- the run finished and its record verifies: the epsilon the platform recomputes from the record's
  noise, sampling rate and steps (never more than was held);
- the trainer may have trained on the rows but left no valid record (killed, failed, timed out, the rows
  taken by the job's own code): all of it;
- the rows never reached the container (cancelled while queued), or the trainer stopped before its first
  step for reasons that do not depend on them (model refused on its graph, bad spec): nothing.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from sandbox.budgets.cost import PrivacyCost, epsilon_units_up
from sandbox.budgets.ledger import job_holder, reserve, settle_part
from sandbox.store.models import BudgetReservation


def hold_training_budget(session: Session, *, job_id: str, contract_id: str, dataset: str, epsilon: float,
                         delta: float) -> BudgetReservation:
    """Reserve the run's (epsilon, delta), or raise BudgetExhausted and hold nothing."""
    cost = PrivacyCost.requested(epsilon=epsilon, delta=delta)
    return reserve(session, contract_id=contract_id, dataset=dataset, cost=cost,
                   query_key=f"training:{job_id}", holder=job_holder(job_id))


def hold_training_budgets(session: Session, *, job_id: str, contract_id: str, datasets: list[str], epsilon: float,
                          delta: float) -> dict[str, BudgetReservation]:
    """Reserve the run's (epsilon, delta) on each dataset's ledger (a model trained on several hospitals'
    data spends the whole of it on each), all or nothing: BudgetExhausted on one releases those already held."""
    held: dict[str, BudgetReservation] = {}
    try:
        # Sorted, so two jobs over the same datasets lock their ledgers in one order.
        for dataset in sorted(datasets):
            held[dataset] = hold_training_budget(session, job_id=job_id, contract_id=contract_id, dataset=dataset,
                                                 epsilon=epsilon, delta=delta)
    except BaseException:
        for reservation in held.values():
            settle_part(session, reservation.id, epsilon_units=0, delta_units=0)
        raise
    return held


def settle_training_budget(session: Session, reservation_id: str, *, spent_epsilon: float | None,
                           whole: bool) -> float:
    """Charge what the run spent (`whole`: all that was held) and give back the rest; the epsilon charged.

    A run that spent any epsilon spent its whole delta (the accountant's epsilon is for that delta)."""
    reservation = session.get(BudgetReservation, reservation_id)
    if reservation is None or reservation.state != "reserved":
        return 0.0
    if whole:
        epsilon_units, delta_units = reservation.epsilon_units, reservation.delta_units
    else:
        epsilon_units = min(epsilon_units_up(spent_epsilon) if spent_epsilon else 0, reservation.epsilon_units)
        delta_units = reservation.delta_units if epsilon_units else 0
    settle_part(session, reservation_id, epsilon_units=epsilon_units, delta_units=delta_units)
    return PrivacyCost(epsilon_units=epsilon_units, delta_units=delta_units).epsilon
