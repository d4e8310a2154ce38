"""What a service call runs with: the transaction, the caller and the audit log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from sandbox.audit import AuditLog, SystemActor
from sandbox.auth.tokens import Principal, Role
from sandbox.config import Settings
from sandbox.errors import Forbidden


@dataclass
class Context:
    session: Session
    actor: Principal | SystemActor
    audit: AuditLog
    settings: Settings

    def record(self, action: str, object_type: str, object_id: str, **details: Any) -> None:
        """Append an audit event inside this context's transaction."""
        self.audit.record(
            self.session, actor=self.actor, action=action, object_type=object_type,
            object_id=object_id, details=details,
        )

    @property
    def is_buyer(self) -> bool:
        return isinstance(self.actor, Principal) and self.actor.role is Role.BUYER

    def require_role(self, *roles: Role) -> Principal:
        """The caller, if it holds one of `roles`; system actors pass everything."""
        if isinstance(self.actor, SystemActor):
            raise Forbidden("this operation needs a person's token")
        if self.actor.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise Forbidden(f"role {self.actor.role.value!r} may not do this (needs {allowed})")
        return self.actor
