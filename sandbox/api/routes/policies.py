"""Policy endpoints: stewards propose new versions and another steward approves them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from sandbox import policies
from sandbox.api import schemas
from sandbox.api.deps import AnyRole, InstanceDep, Steward
from sandbox.api.schemas import Decision

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.get("", response_model=list[schemas.PolicyView], response_model_exclude_unset=True)
def list_policies(instance: InstanceDep, principal: AnyRole) -> list[dict[str, Any]]:
    with instance.read_session() as session:
        return [policies.policy_view(p) for p in policies.list_policies(session, principal)]


@router.get("/{name}/versions/{version}", response_model=schemas.PolicyView, response_model_exclude_unset=True)
def get_policy(name: str, version: int, instance: InstanceDep, principal: AnyRole) -> dict[str, Any]:
    with instance.read_session() as session:
        return policies.policy_view(policies.get_visible_version(session, principal, name, version))


@router.post("", status_code=201, response_model=schemas.PolicyView, response_model_exclude_unset=True)
def propose_policy(body: dict[str, Any], instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        return policies.policy_view(policies.propose_policy(ctx, body))


@router.post("/{name}/versions/{version}/approve", response_model=schemas.PolicyView, response_model_exclude_unset=True)
def approve_policy(name: str, version: int, instance: InstanceDep, steward: Steward,
                   body: Decision | None = None) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        decided = policies.decide_policy(ctx, name=name, version=version, approve=True,
                                         comment=body.comment if body else "")
        return policies.policy_view(decided)


@router.post("/{name}/versions/{version}/reject", response_model=schemas.PolicyView, response_model_exclude_unset=True)
def reject_policy(name: str, version: int, instance: InstanceDep, steward: Steward,
                  body: Decision | None = None) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        decided = policies.decide_policy(ctx, name=name, version=version, approve=False,
                                         comment=body.comment if body else "")
        return policies.policy_view(decided)
