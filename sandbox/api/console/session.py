"""Who is signed in to the console, and proof that a form came from its own pages.

The session cookie holds the caller's token (the instance's JWT, or one from the organisation's
identity provider), so the console admits exactly whom the API admits: the same verifier, the same
revocation list, the same expiry. It is HttpOnly (no script reads it), SameSite=Strict (no other
site's page sends it), scoped to `/console`, and Secure over TLS.

Every form carries a CSRF token: an HMAC of the session's token id under a key derived from the
instance's signing key, so it is bound to one sign-in and cannot be guessed or carried across.
State-changing requests must also come from the console's own origin when the browser says where
they come from (`Origin`, or `Referer` without it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime
from typing import Annotated

from cryptography.hazmat.primitives import serialization
from fastapi import Depends, Request
from fastapi.responses import Response

from sandbox.api.origins import origin_of, over_tls, own_origins
from sandbox.api.problems import PRINCIPAL_STATE
from sandbox.auth.tokens import Principal, Role
from sandbox.errors import Forbidden, SandboxError, Unauthorized
from sandbox.instance import Instance

SESSION_COOKIE = "sandbox_console"
LOGIN_COOKIE = "sandbox_console_login"  # the login form's own CSRF value, before anyone is signed in
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf"


class SignInRequired(SandboxError):
    """No valid console session: the browser is sent to the sign-in page (HTML) rather than shown a 401."""

    status = 401
    title = "Sign in"
    slug = "unauthorized"


def _instance(request: Request) -> Instance:
    instance: Instance = request.app.state.instance
    return instance


def secure_cookies(request: Request) -> bool:
    """Secure cookies over TLS: the request's own scheme, or the instance's public URL behind a proxy."""
    return over_tls(request, _instance(request).settings.public_url)


def _console_key(instance: Instance) -> bytes:
    raw = instance.signing_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
    return hashlib.sha256(b"sandbox-console-csrf-v1\0" + raw).digest()


def csrf_token(instance: Instance, principal: Principal) -> str:
    """The CSRF value every form of this sign-in carries."""
    return hmac.new(_console_key(instance), principal.jti.encode(), hashlib.sha256).hexdigest()


def signed_in(request: Request) -> Principal | None:
    """The verified caller of this request's session cookie, or None (no cookie, or one that no longer verifies)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    instance = _instance(request)
    try:
        principal = instance.verifier.verify(token)
    except Unauthorized:
        return None
    if instance.is_revoked(principal.jti):
        return None
    return principal


def console_user(request: Request) -> Principal:
    principal = signed_in(request)
    if principal is None:
        raise SignInRequired("sign in to use the console")
    # The problem handlers audit this caller's refusals (403, 404) by name, as for API calls.
    setattr(request.state, PRINCIPAL_STATE, principal)
    return principal


ConsoleUser = Annotated[Principal, Depends(console_user)]


def require_role(principal: Principal, *roles: Role) -> None:
    if principal.role not in roles:
        allowed = ", ".join(r.value for r in roles)
        raise Forbidden(f"this page is for {allowed}; you are signed in as {principal.role.value}")


def check_origin(request: Request) -> None:
    """Refuse a state-changing request that the browser says came from another site."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return  # browsers send Origin on every POST; a client without it carries no ambient cookie risk
    if source == "null":
        raise Forbidden("a form posted from an opaque origin is refused")
    if origin_of(source) not in own_origins(request, _instance(request).settings.public_url):
        raise Forbidden("a form posted from another site is refused (cross-site request forgery)")


def check_csrf(request: Request, principal: Principal, submitted: str | None) -> None:
    """A signed-in form: same origin, and the CSRF value of this very sign-in."""
    check_origin(request)
    expected = csrf_token(_instance(request), principal)
    if not submitted or not hmac.compare_digest(submitted, expected):
        raise Forbidden("the form's CSRF token is missing or does not belong to this sign-in; reload the page")


def new_login_nonce() -> str:
    return secrets.token_urlsafe(24)


def check_login_nonce(request: Request, submitted: str | None) -> None:
    check_origin(request)
    expected = request.cookies.get(LOGIN_COOKIE)
    if not expected or not submitted or not hmac.compare_digest(submitted, expected):
        raise Forbidden("the sign-in form expired or was not sent by this console; reload the page")


def set_cookie(request: Request, response: Response, name: str, value: str, *, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max(0, max_age), path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=secure_cookies(request))


def start_session(request: Request, response: Response, token: str, principal: Principal) -> None:
    """The cookie lives no longer than the token in it."""
    remaining = int((principal.expires_at - datetime.now(UTC)).total_seconds())
    set_cookie(request, response, SESSION_COOKIE, token, max_age=remaining)
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
