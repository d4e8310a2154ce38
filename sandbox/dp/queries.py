"""DP queries as a service: check the contract, plan, reserve budget, run, charge, cache, audit."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select

from sandbox.auth.tokens import Principal, Role
from sandbox.catalog.service import get_dataset, get_version
from sandbox.contracts import JobKind, require_usable
from sandbox.dp import ledger
from sandbox.dp.engine import (
    Budget,
    DatasetPrivacy,
    QueryPlan,
    execute,
    plan_query,
    prepare,
    zcdp_to_approx_dp,
)
from sandbox.errors import Invalid
from sandbox.instance import Instance
from sandbox.store.models import BudgetLedger, Contract, DatasetBudget, DpAnswer


class QueryRequest(BaseModel):
    """The body of `POST /v1/queries`: exactly one of `epsilon` (pure DP) or `rho` (zCDP)."""

    model_config = ConfigDict(extra="forbid")

    contract: str = Field(min_length=1, max_length=40)
    dataset: str = Field(min_length=1, max_length=64)
    sql: str = Field(min_length=1, max_length=10_000)
    epsilon: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    rho: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    delta: float = Field(default=0.0, ge=0, lt=1e-3, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_budget(self) -> QueryRequest:
        if (self.epsilon is None) == (self.rho is None):
            raise ValueError("give exactly one of epsilon (pure DP) or rho (zCDP)")
        if self.rho is not None and self.delta <= 0:
            raise ValueError("a zCDP query (rho) needs a delta > 0 to be charged as (epsilon, delta)")
        return self


def charge_for(request: QueryRequest, plan: QueryPlan) -> ledger.Charge:
    """What the ledger is charged, before any noise: pure epsilon, or zCDP converted to (epsilon, delta).

    With private GROUP BY keys the engine gives half of delta to the key threshold and converts
    rho with the other half, so the conversion here uses the same half.
    """
    if request.epsilon is not None:
        return ledger.Charge(epsilon=request.epsilon, delta=request.delta)
    assert request.rho is not None
    conversion_delta = request.delta if plan.public_keys else request.delta / 2
    return ledger.Charge(epsilon=zcdp_to_approx_dp(request.rho, conversion_delta), delta=request.delta)


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


def run_query(instance: Instance, actor: Principal, request: QueryRequest, *, via: str = "api") -> dict[str, Any]:
    """Answer one DP query for a buyer; an over-budget query raises BudgetExhausted and spends nothing."""
    with instance.context(actor) as ctx:
        contract = require_usable(ctx, request.contract, kind=JobKind.QUERY, dataset=request.dataset)
        dataset = get_dataset(ctx.session, request.dataset)
        version = get_version(ctx.session, request.dataset)
        privacy = DatasetPrivacy.from_card(dataset.card)
        plan = plan_query(request.sql, privacy)
        key = cache_key(version.sha256, plan.key, request)
        cached = ctx.session.execute(select(DpAnswer).where(
            DpAnswer.contract_id == contract.id, DpAnswer.cache_key == key)).scalar_one_or_none()
        if cached is not None:
            left = _remaining(ctx.session, contract.id, request.dataset)
            ctx.record("dp.query.cached", "dataset", f"{request.dataset}@{version.version}", contract=contract.id,
                       sql=request.sql, via=via)
            return {**cached.answer, "epsilon_spent": 0.0, "epsilon_remaining": left, "cached": True}
        parquet = instance.settings.artifacts_dir / version.path
        charge = charge_for(request, plan)
        reservation = ledger.reserve(ctx.session, contract_id=contract.id, dataset=request.dataset,
                                     charge=charge, query_key=key)
        reservation_id, version_number = reservation.id, version.version
    cache_dir = dp_cache_dir(instance)
    try:
        answer = execute(plan, Path(parquet), Budget(epsilon=request.epsilon, rho=request.rho, delta=request.delta),
                         cache_dir=cache_dir)
        if answer.epsilon_spent > charge.epsilon + ledger.SLACK or answer.delta_spent > charge.delta + ledger.SLACK:
            raise RuntimeError(f"the engine spent ({answer.epsilon_spent}, {answer.delta_spent}), "
                               f"more than the reserved ({charge.epsilon}, {charge.delta})")
    except BaseException:
        with instance.context(actor) as ctx:
            ledger.settle(ctx.session, reservation_id, spent=False)
            ctx.record("dp.query.failed", "dataset", f"{request.dataset}@{version_number}", contract=request.contract,
                       sql=request.sql, via=via)
        raise
    body = {
        "columns": answer.columns, "rows": answer.rows, "accuracy": answer.accuracy,
        "accuracy_meaning": "half-width of a 95% interval around each noisy cell",
        "mechanism": answer.mechanism, "notes": answer.notes, "dataset_version": version_number,
        "epsilon": request.epsilon, "rho": request.rho, "delta": request.delta,
    }
    with instance.context(actor) as ctx:
        ledger.settle(ctx.session, reservation_id, spent=True)
        ctx.session.add(DpAnswer(contract_id=request.contract, cache_key=key, dataset=request.dataset,
                                 dataset_version=version_number, sql=request.sql, answer=body,
                                 created_at=datetime.now(UTC)))
        ctx.record("dp.query", "dataset", f"{request.dataset}@{version_number}", contract=request.contract,
                   sql=request.sql, epsilon=charge.epsilon, delta=charge.delta, via=via)
        left = _remaining(ctx.session, request.contract, request.dataset)
    return {**body, "epsilon_spent": charge.epsilon, "epsilon_remaining": left, "cached": False}


def _remaining(session: Any, contract_id: str, dataset: str) -> float:
    row = session.execute(select(BudgetLedger).where(
        BudgetLedger.contract_id == contract_id, BudgetLedger.dataset == dataset)).scalar_one()
    return round(ledger.remaining(row, ledger.dataset_budget(session, dataset)), 12)


def budgets(instance: Instance, actor: Principal) -> list[dict[str, object]]:
    """Every ledger the caller may see: a buyer its own org's, a steward all."""
    with instance.read_context(actor) as ctx:
        ctx.require_role(Role.BUYER, Role.STEWARD)
        query = select(BudgetLedger, Contract).join(Contract, Contract.id == BudgetLedger.contract_id)
        if ctx.is_buyer:
            query = query.where(Contract.buyer_org == actor.org)
        views = []
        for row, _contract in ctx.session.execute(query.order_by(BudgetLedger.id)).all():
            views.append(ledger.budget_view(row, ledger.dataset_budget(ctx.session, row.dataset)))
        return views


def set_dataset_cap(instance: Instance, actor: Principal, dataset: str, epsilon_cap: float | None) -> dict[str, Any]:
    with instance.context(actor) as ctx:
        ctx.require_role(Role.STEWARD)
        get_dataset(ctx.session, dataset)
        cap = ledger.ensure_dataset_budget(ctx.session, dataset)
        cap = ctx.session.execute(select(DatasetBudget).where(DatasetBudget.dataset == dataset)
                                  .with_for_update()).scalar_one()
        if epsilon_cap is not None and epsilon_cap < cap.epsilon_spent + cap.epsilon_reserved + cap.mock_epsilon:
            raise Invalid(f"the cap {epsilon_cap:g} is below what {dataset!r} has already spent")
        cap.epsilon_cap = epsilon_cap
        ctx.record("dataset.budget_cap", "dataset", dataset, epsilon_cap=epsilon_cap)
        return {"dataset": dataset, "epsilon_cap": cap.epsilon_cap, "epsilon_spent": cap.epsilon_spent,
                "mock_epsilon": cap.mock_epsilon}


def job_principal(job_id: str, org: str) -> Principal:
    """The identity a job's DP socket acts as: its buyer org, named after the job."""
    return Principal(sub=f"job:{job_id}", org=org, role=Role.BUYER, jti=f"job:{job_id}", issuer="worker",
                     expires_at=datetime.max.replace(tzinfo=UTC))
