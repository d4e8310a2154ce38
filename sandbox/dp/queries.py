"""DP queries as a service: check the contract, plan, reserve budget, run, charge, cache, audit."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from sandbox.auth.tokens import Principal, Role
from sandbox.budgets import ledger
from sandbox.budgets.cost import PrivacyCost, requested_delta_units, requested_epsilon_units
from sandbox.catalog.service import get_dataset, get_version
from sandbox.context import Context
from sandbox.contracts import JobKind, require_usable
from sandbox.dp.duckdb_engine import execute, prepare
from sandbox.dp.plan import DatasetPrivacy, QueryPlan, plan_query
from sandbox.errors import Conflict, Forbidden, Invalid
from sandbox.instance import Instance
from sandbox.store.models import BudgetLedger, BudgetReservation, Contract, Dataset, DpAnswer
from sandbox.store.parties import party_contracts


class QueryRequest(BaseModel):
    """The body of `POST /v1/queries`: exactly one of `epsilon` (pure DP) or `rho` (zCDP).

    Epsilon (and rho) come in fixed steps (EPSILON_STEP, at least EPSILON_MIN, in `sandbox.budgets.cost`)
    and delta in whole units of 1e-12: a budget at arbitrary precision could carry bits (review 10).
    """

    model_config = ConfigDict(extra="forbid")

    contract: str = Field(min_length=1, max_length=40)
    dataset: str = Field(min_length=1, max_length=64)
    sql: str = Field(min_length=1, max_length=10_000)
    epsilon: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False, strict=True)
    rho: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False, strict=True)
    delta: float = Field(default=0.0, ge=0, lt=1e-3, allow_inf_nan=False, strict=True)

    @field_validator("epsilon", "rho")
    @classmethod
    def _on_the_grid(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None:
            try:
                requested_epsilon_units(value, str(info.field_name))
            except Invalid as exc:
                raise ValueError(exc.detail) from exc
        return value

    @field_validator("delta")
    @classmethod
    def _delta_on_the_grid(cls, value: float) -> float:
        try:
            requested_delta_units(value)
        except Invalid as exc:
            raise ValueError(exc.detail) from exc
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> QueryRequest:
        if (self.epsilon is None) == (self.rho is None):
            raise ValueError("give exactly one of epsilon (pure DP) or rho (zCDP)")
        if self.rho is not None and self.delta <= 0:
            raise ValueError("a zCDP query (rho) needs a delta > 0 to be charged as (epsilon, delta)")
        return self


def request_from_socket(body: dict[str, Any], *, contract: str, dataset: str) -> QueryRequest:
    """A DP socket's request: the socket fixes contract and dataset, the body may name only the query.

    A body that names a contract or a dataset (even the socket's own) is refused, as is any other field.
    """
    unknown = sorted(set(body) - {"sql", "epsilon", "rho", "delta"})
    if unknown:
        raise Invalid(f"unknown fields {unknown}; send sql and epsilon (or rho and delta); the socket fixes "
                      "the contract and dataset", errors=[f"field {name!r} is not allowed" for name in unknown])
    return QueryRequest(contract=contract, dataset=dataset, **body)


def socket_handler(instance: Instance, *, job_id: str, org: str, contract: str, dataset: str, via: str,
                   on_answer: Callable[[QueryRequest, dict[str, Any]], None] | None = None,
                   ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The `POST /query` handler of a job's or kernel's DP socket (`sandbox.dp.socket_server.DpSocket`).

    The socket fixes the contract and dataset; the query acts as the job's buyer org (`job_principal`).
    `on_answer` sees each answered query before it leaves, to keep the platform's own record of it; it may
    add fields to the answer (a notebook adds the record's id).
    """
    principal = job_principal(job_id, org)

    def handle(body: dict[str, Any]) -> dict[str, Any]:
        request = request_from_socket(body, contract=contract, dataset=dataset)
        answer = run_query(instance, principal, request, via=via)
        if on_answer is not None:
            on_answer(request, answer)
        return answer

    return handle


def check_query(instance: Instance, actor: Principal, request: QueryRequest) -> None:
    """What the API process checks before it forwards a query to the worker: the contract is usable for
    queries on the dataset, which has a version, and the SQL plans against its card. Reads the store only,
    never the data; the worker checks all of it again under the ledger's lock.
    """
    try:
        with instance.read_context(actor) as ctx:
            _check_query(ctx, request)
    except Forbidden:
        # A refused contract goes on the audit chain as every refused use does (Instance.context records it).
        with instance.context(actor) as ctx:
            _check_query(ctx, request)


def _check_query(ctx: Context, request: QueryRequest) -> None:
    require_usable(ctx, request.contract, kind=JobKind.QUERY, dataset=request.dataset)
    version = get_version(ctx.session, request.dataset)  # 404 for no dataset, or none with a version, as run_query
    charge_for(request, plan_query(request.sql, DatasetPrivacy.from_card(version.dataset.card)))


def charge_for(request: QueryRequest, plan: QueryPlan) -> PrivacyCost:
    """What the query costs, before any noise: computed once by its plan, then reserved, run and reported as is."""
    return plan.cost(epsilon=request.epsilon, rho=request.rho, delta=request.delta)


def cache_key(version_sha256: str, plan_key: str, request: QueryRequest) -> str:
    material = json.dumps([version_sha256, plan_key, request.epsilon, request.rho, request.delta])
    return hashlib.sha256(material.encode()).hexdigest()


def dp_cache_dir(instance: Instance) -> Path:
    """Ranked copies of versions for per-unit bounding: real rows, so inside the 0700 home."""
    directory = instance.settings.home_dir / "dp-cache"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def warm_up(instance: Instance, dataset: str, version: int) -> None:
    """Rank a new version's rows within their units now, so its first DP query is as fast as the rest."""
    with instance.read_session() as session:
        record = get_dataset(session, dataset)
        chosen = get_version(session, dataset, version)
        privacy, parquet = DatasetPrivacy.from_card(record.card), instance.settings.artifacts_dir / chosen.path
    if not privacy.one_row_per_unit:
        prepare(parquet, privacy, cache_dir=dp_cache_dir(instance))


def settle_abandoned_reservations(instance: Instance) -> int:
    """Release the reservations of processes that died mid-query; call once when a process starts.

    Also done lazily before this process's first query, for processes whose start-up does not call it.
    Reservations are held where queries run: the worker (`sandbox.worker_socket`), or a job's or kernel's
    DP socket.
    """
    with _STARTED_LOCK:
        _STARTED.add(instance)
    with instance.system_context() as ctx:
        released = ledger.release_abandoned(ctx.session)
        if released:
            ctx.record("dp.reservations.released", "budget", "abandoned", count=released, holder=ledger.HOLDER)
    return released


_STARTED: weakref.WeakSet[Instance] = weakref.WeakSet()
_STARTED_LOCK = threading.Lock()


def _started(instance: Instance) -> None:
    with _STARTED_LOCK:
        if instance in _STARTED:
            return
    settle_abandoned_reservations(instance)


@dataclass(frozen=True)
class _Reserved:
    reservation_id: str
    contract_id: str
    key: str
    version: int
    parquet: Path
    plan: QueryPlan
    cost: PrivacyCost


@dataclass(frozen=True)
class _Waiting:
    """An identical query holds a reservation: wait for its answer instead of paying again."""

    reservation_id: str


WAIT_FOR_IDENTICAL_S = 900.0


def run_query(instance: Instance, actor: Principal, request: QueryRequest, *, via: str = "api") -> dict[str, Any]:
    """Answer one DP query for a buyer; an over-budget query raises BudgetExhausted and spends nothing.

    Identical concurrent queries (same contract, version, plan and budget) fly once: the first
    reserves and runs, the others wait for its answer and receive it as cached, paying nothing.
    """
    _started(instance)
    deadline = time.monotonic() + WAIT_FOR_IDENTICAL_S
    while True:
        outcome = _reserve_or_reuse(instance, actor, request, via)
        if isinstance(outcome, dict):
            return outcome
        if isinstance(outcome, _Reserved):
            try:
                return _run_reserved(instance, actor, request, outcome, via)
            except IntegrityError:
                continue  # a twin stored the same answer first (its reservation is released): reuse it
        _wait_for(instance, outcome.reservation_id, deadline)


def _reserve_or_reuse(instance: Instance, actor: Principal, request: QueryRequest,
                      via: str) -> dict[str, Any] | _Reserved | _Waiting:
    with instance.context(actor) as ctx:
        contract = require_usable(ctx, request.contract, kind=JobKind.QUERY, dataset=request.dataset)
        dataset = get_dataset(ctx.session, request.dataset)
        version = get_version(ctx.session, request.dataset)
        privacy = DatasetPrivacy.from_card(dataset.card)
        plan = plan_query(request.sql, privacy)
        key = cache_key(version.sha256, plan.key, request)
        cost = charge_for(request, plan)
        # The ledger row lock serialises every query of this contract on this dataset, so the look
        # for a finished or running twin below and the reservation cannot interleave with another's.
        ledger_row, _ = ledger.lock(ctx.session, contract.id, request.dataset)
        cached = ctx.session.execute(select(DpAnswer).where(
            DpAnswer.contract_id == contract.id, DpAnswer.cache_key == key)).scalar_one_or_none()
        if cached is not None:
            ctx.record("dp.query.cached", "dataset", f"{request.dataset}@{version.version}", contract=contract.id,
                       sql=request.sql, via=via)
            return {**cached.answer, "epsilon_spent": 0.0,
                    "epsilon_remaining": ledger.remaining_epsilon(ledger_row), "cached": True}
        running = ctx.session.execute(select(BudgetReservation.id).where(
            BudgetReservation.ledger_id == ledger_row.id, BudgetReservation.query_key == key,
            BudgetReservation.state == "reserved")).scalars().first()
        if running is not None:
            return _Waiting(running)
        reservation = ledger.reserve(ctx.session, contract_id=contract.id, dataset=request.dataset,
                                     cost=cost, query_key=key)
        return _Reserved(reservation_id=reservation.id, contract_id=contract.id, key=key, version=version.version,
                         parquet=instance.settings.artifacts_dir / version.path, plan=plan, cost=cost)


def _wait_for(instance: Instance, reservation_id: str, deadline: float) -> None:
    """Block until the reservation is settled (its answer stored, or released), or refuse at the deadline."""
    while time.monotonic() < deadline:
        with instance.read_session() as session:
            state = session.execute(select(BudgetReservation.state).where(
                BudgetReservation.id == reservation_id)).scalar_one_or_none()
        if state != "reserved":
            return
        instance.wait_for_change(0.1)  # woken by commits in this process; polls for other processes'
    raise Conflict("an identical query is still running; ask again later (nothing was spent)")


def _run_reserved(instance: Instance, actor: Principal, request: QueryRequest, held: _Reserved,
                  via: str) -> dict[str, Any]:
    """Run a reserved query, store and charge its answer; any failure gives the reservation back."""
    committed = False
    try:
        answer = execute(held.plan, held.parquet, held.cost, cache_dir=dp_cache_dir(instance))
        if not held.cost.covers(epsilon=answer.epsilon_spent, delta=answer.delta_spent):
            raise RuntimeError(f"the engine spent ({answer.epsilon_spent}, {answer.delta_spent}), "
                               f"more than the reserved ({held.cost.epsilon}, {held.cost.delta})")
        body = {
            "columns": answer.columns, "rows": _json_safe(answer.rows), "accuracy": answer.accuracy,
            "accuracy_meaning": "half-width of a 95% interval around each noisy cell",
            "mechanism": answer.mechanism, "notes": answer.notes, "dataset_version": held.version,
            "epsilon": request.epsilon, "rho": request.rho, "delta": request.delta,
        }
        with instance.context(actor) as ctx:
            ledger_row = ledger.settle(ctx.session, held.reservation_id, spent=True)
            ctx.session.add(DpAnswer(contract_id=held.contract_id, cache_key=held.key, dataset=request.dataset,
                                     dataset_version=held.version, sql=request.sql, answer=body,
                                     created_at=datetime.now(UTC)))
            ctx.session.flush()
            ctx.record("dp.query", "dataset", f"{request.dataset}@{held.version}", contract=held.contract_id,
                       sql=request.sql, epsilon=held.cost.epsilon, delta=held.cost.delta, via=via)
            left = ledger.remaining_epsilon(ledger_row)
        committed = True
    finally:
        if not committed:
            with instance.context(actor) as ctx:
                ledger.settle(ctx.session, held.reservation_id, spent=False)
                ctx.record("dp.query.failed", "dataset", f"{request.dataset}@{held.version}",
                           contract=held.contract_id, sql=request.sql, via=via)
    return {**body, "epsilon_spent": held.cost.epsilon, "epsilon_remaining": left, "cached": False}


def _json_safe(value: Any) -> Any:
    """Answer cells as JSON values: dates and timestamps as ISO text, decimals as numbers (review 11.5)."""
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, datetime | date | dt_time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def budgets(instance: Instance, actor: Principal) -> list[dict[str, object]]:
    """Every ledger the caller may see: a buyer its own org's contracts only, a steward those its own org
    granted (never another holder's), with cap totals.

    Read from the store only (the API process serves it): it settles no reservation, since in the API
    process every reservation held is a live worker's.
    """
    with instance.read_context(actor) as ctx:
        ctx.require_role(Role.BUYER, Role.STEWARD)
        query = select(BudgetLedger, Contract).join(Contract, Contract.id == BudgetLedger.contract_id)
        if ctx.is_buyer:
            query = query.where(Contract.buyer_org == actor.org)
        else:
            # A party's steward sees the ledgers of its own datasets under every contract naming them.
            query = query.where(Contract.id.in_(party_contracts(actor.org)),
                                BudgetLedger.dataset.in_(select(Dataset.name).where(Dataset.owner_org == actor.org)))
        views = []
        for row, _contract in ctx.session.execute(query.order_by(BudgetLedger.id)).all():
            views.append(ledger.budget_view(row, ledger.dataset_budget(ctx.session, row.dataset),
                                            steward=not ctx.is_buyer))
        return views


def set_dataset_cap(instance: Instance, actor: Principal, dataset: str, epsilon_cap: float | None) -> dict[str, Any]:
    with instance.context(actor) as ctx:
        ctx.require_role(Role.STEWARD)
        get_dataset(ctx.session, dataset)
        cap = ledger.set_cap(ctx.session, dataset, epsilon_cap)
        ctx.record("dataset.budget_cap", "dataset", dataset, epsilon_cap=epsilon_cap)
        return {"dataset": dataset, "epsilon_cap": cap.epsilon_cap, "epsilon_spent": cap.epsilon_spent,
                "mock_epsilon": cap.mock_epsilon}


def job_principal(job_id: str, org: str) -> Principal:
    """The identity a job's DP socket acts as: its buyer org, named after the job."""
    return Principal(sub=f"job:{job_id}", org=org, role=Role.BUYER, jti=f"job:{job_id}", issuer="worker",
                     expires_at=datetime.max.replace(tzinfo=UTC))
