"""Token administration over HTTP: admins issue and revoke; anyone can ask who they are."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from sandbox.api import schemas
from sandbox.api.deps import Admin, AnyRole, InstanceDep
from sandbox.auth.tokens import Role

router = APIRouter(prefix="/v1", tags=["tokens"])


class TokenRequest(BaseModel):
    sub: str = Field(min_length=1, max_length=200)
    org: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    role: Role
    ttl: int | None = Field(default=None, gt=0)


@router.get("/whoami", response_model=schemas.WhoAmI, response_model_exclude_unset=True)
def whoami(principal: AnyRole) -> dict[str, Any]:
    return {"sub": principal.sub, "org": principal.org, "role": principal.role.value, "jti": principal.jti,
            "expires_at": principal.expires_at.isoformat()}


@router.post("/tokens", status_code=201, response_model=schemas.IssuedTokenView, response_model_exclude_unset=True)
def issue(body: TokenRequest, instance: InstanceDep, admin: Admin) -> dict[str, Any]:
    issued = instance.issue_token(sub=body.sub, org=body.org, role=body.role, ttl_s=body.ttl, issued_by=admin)
    return {"token": issued.token, "jti": issued.jti, "expires_at": issued.expires_at.isoformat()}


@router.post("/tokens/{jti}/revoke", response_model=schemas.RevokedToken, response_model_exclude_unset=True)
def revoke(jti: str, instance: InstanceDep, admin: Admin) -> dict[str, str]:
    instance.revoke_token(jti, revoked_by=admin)
    return {"jti": jti, "status": "revoked"}
