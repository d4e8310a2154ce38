"""Data-use contracts: who may do what with which datasets, until when, under which policy."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from sandbox.auth.orgs import ORG_PATTERN
from sandbox.auth.tokens import Principal, Role
from sandbox.billing.prices import PriceList
from sandbox.budgets.ledger import ensure_ledgers
from sandbox.catalog.cards import LicenceTerms
from sandbox.catalog.service import card_of, get_dataset, owned_dataset
from sandbox.context import Context
from sandbox.errors import Conflict, ContractNotUsable, Forbidden, Invalid, NotFound
from sandbox.policies import resolve_policy
from sandbox.store.models import Contract

MAX_EPSILON = 100.0


class Tier(StrEnum):
    DP_ONLY = "dp_only"
    AGGREGATE = "aggregate"
    TRUSTED = "trusted"


class JobKind(StrEnum):
    ANALYSIS = "analysis"
    TRAINING = "training"
    DP_TRAINING = "dp_training"
    NOTEBOOK = "notebook"
    QUERY = "query"


class Quotas(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu_hours: float = Field(default=100.0, ge=0)
    gpu_hours: float = Field(default=0.0, ge=0)
    concurrent_jobs: int = Field(default=2, ge=1, le=1000)
    output_mb: float = Field(default=500.0, ge=0)


class ContractRequest(BaseModel):
    """The body of `POST /v1/contracts`."""

    model_config = ConfigDict(extra="forbid")

    buyer_org: str = Field(pattern=ORG_PATTERN)
    datasets: list[str] = Field(min_length=1, max_length=100)
    tier: Tier
    kinds: list[JobKind] = Field(min_length=1)
    purpose: str = Field(min_length=1, max_length=5000)
    valid_from: datetime | date | None = None
    valid_until: datetime | date
    epsilon: float = Field(gt=0, le=MAX_EPSILON)
    delta: float = Field(default=0.0, ge=0, lt=1e-3)
    quotas: Quotas = Field(default_factory=Quotas)
    policy: str = Field(default="default", pattern=r"^[a-z][a-z0-9-]{0,62}(@[0-9]+)?$")
    prices: PriceList | None = None

    @field_validator("valid_from", "valid_until", mode="before")
    @classmethod
    def _plain_dates(cls, value: Any) -> Any:
        # Pydantic reads "2027-06-30" as that day's midnight; a plain date means the whole UTC day.
        if isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
            return date.fromisoformat(value)
        return value

    @field_validator("datasets", "kinds")
    @classmethod
    def _unique(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise ValueError("must not repeat an entry")
        return values


def as_utc(moment: datetime | date, *, end_of_day: bool = False) -> datetime:
    """Dates mean UTC days: `valid_until: 2027-06-30` covers that whole day."""
    if not isinstance(moment, datetime):
        moment = datetime.combine(moment, time.max if end_of_day else time.min)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def create_contract(ctx: Context, request: ContractRequest) -> Contract:
    steward = ctx.require_role(Role.STEWARD)
    now = datetime.now(UTC)
    valid_from = as_utc(request.valid_from) if request.valid_from is not None else now
    valid_until = as_utc(request.valid_until, end_of_day=True)
    errors = []
    if valid_until <= now:
        errors.append(f"valid_until {valid_until.isoformat()} is in the past")
    if valid_until <= valid_from:
        errors.append("valid_until must be after valid_from")
    if request.buyer_org == steward.org:
        # A buyer org's members never hold steward rights over its own jobs (review 11.10): the
        # steward who grants a contract would be the one approving and reviewing its work.
        raise Forbidden("a steward may not grant a contract to their own organisation", object="contract")
    for name in request.datasets:
        try:
            dataset = owned_dataset(ctx.session, name, steward)
        except NotFound:
            # Another org's dataset reads as a missing one: a steward grants only their own org's data.
            errors.append(f"dataset {name!r} does not exist")
            continue
        errors.extend(licence_problems(card_of(dataset).licence, dataset=name, kinds=request.kinds))
    if errors:
        raise Invalid("the contract is invalid", errors)
    policy = resolve_policy(ctx.session, request.policy, org=steward.org)
    contract = Contract(
        id=f"c-{uuid.uuid4().hex[:12]}",
        buyer_org=request.buyer_org,
        datasets=list(request.datasets),
        tier=request.tier.value,
        kinds=[k.value for k in request.kinds],
        purpose=request.purpose,
        valid_from=valid_from,
        valid_until=valid_until,
        epsilon=request.epsilon,
        delta=request.delta,
        quotas=request.quotas.model_dump(),
        policy_name=policy.name,
        policy_version=policy.version,
        owner_org=steward.org,
        created_by=steward.sub,
        created_at=now,
        prices=request.prices.stored() if request.prices is not None else {},
    )
    ctx.session.add(contract)
    ctx.session.flush()
    ensure_ledgers(ctx.session, contract)
    ctx.record(
        "contract.create", "contract", contract.id, buyer_org=contract.buyer_org, datasets=contract.datasets,
        tier=contract.tier, kinds=contract.kinds, epsilon=contract.epsilon, policy=f"{policy.name}@{policy.version}",
        prices=contract.prices,
    )
    return contract


def _visible(ctx: Context) -> Any:
    """The contracts the caller may see: a buyer its org's, a steward those its org granted."""
    if isinstance(ctx.actor, Principal) and ctx.actor.role is Role.BUYER:
        return Contract.buyer_org == ctx.actor.org
    if isinstance(ctx.actor, Principal) and ctx.actor.role is Role.STEWARD:
        return Contract.owner_org == ctx.actor.org
    return None  # auditors (and the service itself) read every contract


def get_contract(ctx: Context, contract_id: str, *, for_update: bool = False) -> Contract:
    """A contract the caller may see; another org's contract is 'not found', not 'forbidden'."""
    query = select(Contract).where(Contract.id == contract_id)
    visible = _visible(ctx)
    if visible is not None:
        query = query.where(visible)
    if for_update:
        query = query.with_for_update()
    contract = ctx.session.execute(query).scalar_one_or_none()
    if contract is None:
        raise NotFound(f"contract {contract_id!r} does not exist")
    return contract


def list_contracts(ctx: Context) -> list[Contract]:
    ctx.require_role(Role.STEWARD, Role.BUYER, Role.AUDITOR)
    query = select(Contract).order_by(Contract.created_at.desc())
    visible = _visible(ctx)
    if visible is not None:
        query = query.where(visible)
    return list(ctx.session.execute(query).scalars())


def revoke_contract(ctx: Context, contract_id: str, reason: str = "") -> Contract:
    steward = ctx.require_role(Role.STEWARD)
    contract = get_contract(ctx, contract_id, for_update=True)
    if contract.revoked_at is not None:
        raise Conflict(f"contract {contract_id} was already revoked at {contract.revoked_at.isoformat()}")
    contract.revoked_at = datetime.now(UTC)
    contract.revoked_by = steward.sub
    ctx.record("contract.revoke", "contract", contract.id, reason=reason)
    return contract


@dataclass(frozen=True)
class Use:
    """One intended use of a contract, checked by `require_usable`."""

    kind: JobKind
    dataset: str
    org: str


def contract_state(contract: Contract, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if contract.revoked_at is not None:
        return "revoked"
    if now < contract.valid_from:
        return "not_yet_valid"
    if now > contract.valid_until:
        return "expired"
    return "active"


def usability_problems(contract: Contract, use: Use, now: datetime | None = None) -> list[str]:
    """Why `contract` does not cover `use` at `now`; empty when it does. Pure."""
    problems = []
    state = contract_state(contract, now)
    if state == "revoked":
        problems.append(f"contract {contract.id} was revoked")
    elif state == "expired":
        problems.append(f"contract {contract.id} expired at {contract.valid_until.isoformat()}")
    elif state == "not_yet_valid":
        problems.append(f"contract {contract.id} is valid only from {contract.valid_from.isoformat()}")
    if use.org != contract.buyer_org:
        problems.append(f"contract {contract.id} belongs to another organisation")
    if use.dataset not in contract.datasets:
        problems.append(f"contract {contract.id} does not cover dataset {use.dataset!r}")
    if use.kind.value not in contract.kinds:
        problems.append(f"contract {contract.id} does not allow {use.kind.value} (allows {', '.join(contract.kinds)})")
    return problems


def licence_problems(licence: LicenceTerms, *, dataset: str, kinds: list[JobKind]) -> list[str]:
    """The kinds of use that `dataset`'s licence forbids, one reason each; empty when it allows all. Pure."""
    named = f"licence {licence.name!r}" if licence.name else "its licence"
    problems = []
    for kind in kinds:
        if licence.allows(kind.value):
            continue
        if kind in (JobKind.TRAINING, JobKind.DP_TRAINING) and not licence.training_allowed:
            problems.append(f"dataset {dataset!r}: {named} does not allow training (training_allowed is false), "
                            f"so no contract may grant {kind.value}")
        else:
            problems.append(f"dataset {dataset!r}: {named} does not permit {kind.value} "
                            f"(permits {', '.join(licence.permitted_uses) or 'nothing'})")
    return problems


def require_usable(ctx: Context, contract_id: str, *, kind: JobKind, dataset: str) -> Contract:
    """The contract, if the calling buyer may use it for `kind` on `dataset` right now."""
    buyer = ctx.require_role(Role.BUYER)
    contract = get_contract(ctx, contract_id)
    problems = usability_problems(contract, Use(kind=kind, dataset=dataset, org=buyer.org))
    if dataset in contract.datasets:
        # The licence as the dataset's card states it now: terms made stricter stop existing contracts too.
        problems.extend(licence_problems(card_of(get_dataset(ctx.session, dataset)).licence, dataset=dataset,
                                         kinds=[kind]))
    if problems:
        raise ContractNotUsable("; ".join(problems))
    return contract


def contract_view(contract: Contract) -> dict[str, Any]:
    return {
        "id": contract.id,
        "buyer_org": contract.buyer_org,
        "datasets": contract.datasets,
        "tier": contract.tier,
        "kinds": contract.kinds,
        "purpose": contract.purpose,
        "valid_from": contract.valid_from.isoformat(),
        "valid_until": contract.valid_until.isoformat(),
        "epsilon": contract.epsilon,
        "delta": contract.delta,
        "quotas": contract.quotas,
        "policy": f"{contract.policy_name}@{contract.policy_version}",
        "state": contract_state(contract),
        "revoked_at": contract.revoked_at.isoformat() if contract.revoked_at else None,
        "owner_org": contract.owner_org,
        "created_by": contract.created_by,
        "created_at": contract.created_at.isoformat(),
        "prices": contract.prices or {},
    }
