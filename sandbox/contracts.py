"""Data-use contracts: who may do what with which datasets, until when, under which policy."""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Sequence
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
from sandbox.catalog.service import card_of, get_dataset
from sandbox.context import Context
from sandbox.errors import Conflict, ContractNotUsable, Forbidden, Invalid, NotFound
from sandbox.policies import resolve_policy
from sandbox.store.models import Contract, ContractParty
from sandbox.store.parties import party_contracts

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
    # A contract may name other hospitals' datasets (their public catalog names): each data-holder org
    # becomes a party that must consent before the contract is usable (issue 17).
    holders: dict[str, list[str]] = defaultdict(list)
    for name in request.datasets:
        try:
            dataset = get_dataset(ctx.session, name)
        except NotFound:
            errors.append(f"dataset {name!r} does not exist")
            continue
        holders[dataset.owner_org].append(name)
        errors.extend(licence_problems(card_of(dataset).licence, dataset=name, kinds=request.kinds))
    if holders and steward.org not in holders:
        errors.append(f"a contract names at least one dataset of the granting steward's own org ({steward.org}); "
                      "another org's data is granted by its own stewards")
    if request.buyer_org in holders:
        errors.append(f"the buyer org {request.buyer_org} holds a dataset of the contract: no org is granted its "
                      "own data, since its stewards would approve and review its jobs")
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
    for org in sorted(holders):
        # Another party's policy is its own choice, made when it consents; until then it reads as the
        # creator's, which binds nothing since the contract is unusable.
        own = org == steward.org
        ctx.session.add(ContractParty(contract_id=contract.id, org=org, policy_name=policy.name,
                                      policy_version=policy.version, consented_by=steward.sub if own else None,
                                      consented_at=now if own else None))
    ctx.session.flush()
    ctx.session.refresh(contract, ["parties"])
    ensure_ledgers(ctx.session, contract)
    ctx.record(
        "contract.create", "contract", contract.id, buyer_org=contract.buyer_org, datasets=contract.datasets,
        tier=contract.tier, kinds=contract.kinds, epsilon=contract.epsilon, policy=f"{policy.name}@{policy.version}",
        prices=contract.prices, parties=sorted(holders),
    )
    return contract


def consent_contract(ctx: Context, contract_id: str, *, policy: str | None = None, comment: str = "") -> Contract:
    """A party org's steward consents to a contract naming its data, under its own policy (`name` or
    `name@N`, its newest approved `default` when not given). 404 to a steward of no party org."""
    steward = ctx.require_role(Role.STEWARD)
    contract = get_contract(ctx, contract_id, for_update=True)
    party = next((p for p in contract.parties if p.org == steward.org), None)
    if party is None:
        raise NotFound(f"contract {contract_id!r} does not exist")
    if party.consented_at is not None:
        raise Conflict(f"{steward.org} already consented to contract {contract.id} "
                       f"({party.consented_by}, {party.consented_at.isoformat()})")
    if contract.revoked_at is not None:
        raise Conflict(f"contract {contract.id} was revoked at {contract.revoked_at.isoformat()}")
    problems = []
    for name in contract.datasets:
        dataset = get_dataset(ctx.session, name)
        if dataset.owner_org == steward.org:
            problems.extend(licence_problems(card_of(dataset).licence, dataset=name,
                                             kinds=[JobKind(k) for k in contract.kinds]))
    if problems:
        raise Invalid("the contract grants uses the org's licences forbid", problems)
    chosen = resolve_policy(ctx.session, policy or "default", org=steward.org)
    party.policy_name, party.policy_version = chosen.name, chosen.version
    party.consented_by, party.consented_at = steward.sub, datetime.now(UTC)
    ctx.session.flush()
    ctx.record("contract.consent", "contract", contract.id, org=steward.org, policy=f"{chosen.name}@{chosen.version}",
               comment=comment)
    return contract


def _visible(ctx: Context) -> Any:
    """The contracts the caller may see: a buyer its org's, a steward those naming its org's data."""
    if isinstance(ctx.actor, Principal) and ctx.actor.role is Role.BUYER:
        return Contract.buyer_org == ctx.actor.org
    if isinstance(ctx.actor, Principal) and ctx.actor.role is Role.STEWARD:
        return Contract.id.in_(party_contracts(ctx.actor.org))
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
    waiting = missing_consents(contract)
    if waiting:
        problems.append(f"contract {contract.id} waits for the consent of {', '.join(waiting)}")
    return problems


def missing_consents(contract: Contract) -> list[str]:
    """The party orgs that have not consented yet, sorted. Pure."""
    return sorted(party.org for party in contract.parties if party.consented_at is None)


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


def require_usable(ctx: Context, contract_id: str, *, kind: JobKind, dataset: str,
                   also: Sequence[str] = ()) -> Contract:
    """The contract, if the calling buyer may use it for `kind` on `dataset` (and the datasets `also`)
    right now."""
    buyer = ctx.require_role(Role.BUYER)
    contract = get_contract(ctx, contract_id)
    problems = []
    for name in dict.fromkeys([dataset, *also]):
        for problem in usability_problems(contract, Use(kind=kind, dataset=name, org=buyer.org)):
            if problem not in problems:
                problems.append(problem)
        if name in contract.datasets:
            # The licence as the dataset's card states it now: terms made stricter stop existing contracts too.
            problems.extend(licence_problems(card_of(get_dataset(ctx.session, name)).licence, dataset=name,
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
        "parties": [party_view(party) for party in contract.parties],
    }


def party_view(party: ContractParty) -> dict[str, Any]:
    """One data-holder org of a contract: its policy and its consent (None while it has not consented)."""
    return {"org": party.org, "policy": f"{party.policy_name}@{party.policy_version}",
            "consented_by": party.consented_by,
            "consented_at": party.consented_at.isoformat() if party.consented_at else None}
