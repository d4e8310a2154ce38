"""Dependencies: an endpoint's signature reads as its contract (who may call, with what)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from sandbox.api.problems import PRINCIPAL_STATE
from sandbox.auth.tokens import Principal, Role
from sandbox.errors import Forbidden, Unauthorized
from sandbox.instance import Instance


def get_instance(request: Request) -> Instance:
    instance: Instance = request.app.state.instance
    return instance


InstanceDep = Annotated[Instance, Depends(get_instance)]


def get_principal(request: Request, instance: InstanceDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise Unauthorized("missing bearer token")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    principal = instance.verifier.verify(token.strip())
    if instance.is_revoked(principal.jti):
        raise Unauthorized("token revoked")
    # The problem handlers audit this caller's refusals (403, 404) by name.
    setattr(request.state, PRINCIPAL_STATE, principal)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(*roles: Role) -> object:
    """A dependency that admits only `roles`."""

    def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise Forbidden(f"role {principal.role.value!r} may not call this (needs {allowed})")
        return principal

    return Depends(check)


Steward = Annotated[Principal, require(Role.STEWARD)]
Buyer = Annotated[Principal, require(Role.BUYER)]
Admin = Annotated[Principal, require(Role.ADMIN)]
StewardOrAuditor = Annotated[Principal, require(Role.STEWARD, Role.AUDITOR)]
MetricsReader = Annotated[Principal, require(Role.ADMIN, Role.AUDITOR, Role.STEWARD)]
AnyRole = PrincipalDep
