"""One exception hierarchy; `sandbox.api.problems` maps it to RFC 9457 problem+json."""

from __future__ import annotations

from typing import Any


class SandboxError(Exception):
    """Base of every error the service reports to a caller; the message is safe to show."""

    status = 500
    title = "Internal error"
    slug = "internal"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class Unauthorized(SandboxError):
    status = 401
    title = "Unauthorized"
    slug = "unauthorized"


class Forbidden(SandboxError):
    status = 403
    title = "Forbidden"
    slug = "forbidden"


class NotFound(SandboxError):
    status = 404
    title = "Not found"
    slug = "not-found"


class Conflict(SandboxError):
    status = 409
    title = "Conflict"
    slug = "conflict"


class PayloadTooLarge(SandboxError):
    status = 413
    title = "Payload too large"
    slug = "payload-too-large"


class Invalid(SandboxError):
    """A well-formed request whose content breaks a rule; `errors` lists each problem."""

    status = 422
    title = "Invalid request"
    slug = "invalid"

    def __init__(self, detail: str, errors: list[str] | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.errors = errors or []
        if self.errors:
            self.extra["errors"] = self.errors


class ContractNotUsable(Forbidden):
    """The contract exists but is expired, revoked, not yet valid or does not cover the use."""

    slug = "contract-not-usable"
    title = "Contract not usable"


class TooManyRequests(SandboxError):
    """A per-token or per-org limit is reached; `Retry-After` says when to try again."""

    status = 429
    title = "Too many requests"
    slug = "too-many-requests"

    def __init__(self, detail: str, *, retry_after_s: int, **extra: Any) -> None:
        super().__init__(detail, retry_after_s=retry_after_s, **extra)
        self.headers = {"Retry-After": str(retry_after_s)}
