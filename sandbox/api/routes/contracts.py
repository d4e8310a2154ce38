"""Contract endpoints: stewards write and revoke; buyers read their own org's."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from sandbox import contracts
from sandbox.api import schemas
from sandbox.api.deps import AnyRole, InstanceDep, Steward
from sandbox.auth.tokens import Role

router = APIRouter(prefix="/v1/contracts", tags=["contracts"])


class RevokeRequest(BaseModel):
    reason: str = Field(default="", max_length=2000)


@router.post("", status_code=201, response_model=schemas.ContractView, response_model_exclude_unset=True)
def create_contract(body: contracts.ContractRequest, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        return contracts.contract_view(contracts.create_contract(ctx, body))


@router.get("", response_model=list[schemas.ContractView], response_model_exclude_unset=True)
def list_contracts(instance: InstanceDep, principal: AnyRole) -> list[dict[str, Any]]:
    with instance.context(principal) as ctx:
        return [contracts.contract_view(c) for c in contracts.list_contracts(ctx)]


@router.get("/{contract_id}", response_model=schemas.ContractView, response_model_exclude_unset=True)
def get_contract(contract_id: str, instance: InstanceDep, principal: AnyRole) -> dict[str, Any]:
    with instance.context(principal) as ctx:
        ctx.require_role(Role.STEWARD, Role.BUYER, Role.AUDITOR)
        contract = contracts.get_contract(ctx, contract_id)
        ctx.record("contract.read", "contract", contract.id)
        return contracts.contract_view(contract)


@router.post("/{contract_id}/revoke", response_model=schemas.ContractView, response_model_exclude_unset=True)
def revoke_contract(contract_id: str, instance: InstanceDep, steward: Steward,
                    body: RevokeRequest | None = None) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        reason = body.reason if body else ""
        return contracts.contract_view(contracts.revoke_contract(ctx, contract_id, reason))


class ConsentRequest(BaseModel):
    policy: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,62}(@[0-9]+)?$",
                               description="the consenting org's policy, name or name@version (default: default)")
    comment: str = Field(default="", max_length=2000)


@router.post("/{contract_id}/consent", response_model=schemas.ContractView, response_model_exclude_unset=True)
def consent_contract(contract_id: str, instance: InstanceDep, steward: Steward,
                     body: ConsentRequest | None = None) -> dict[str, Any]:
    """A steward of a party org consents to the contract naming its data (issue 17)."""
    with instance.context(steward) as ctx:
        consent = body or ConsentRequest()
        return contracts.contract_view(contracts.consent_contract(ctx, contract_id, policy=consent.policy,
                                                                  comment=consent.comment))
