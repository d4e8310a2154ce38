"""Signing in to the console through the organisation's OpenID Connect provider: authorization code + PKCE.

`/console/oidc/start` sends the browser to the provider with a fresh `state`, `nonce` and PKCE
challenge (S256), and keeps them, with the page to return to, in a short-lived cookie of this flow.
`/console/oidc/callback` takes the provider's answer: the `state` must be this browser's, the code is
exchanged at the token endpoint (with the client secret and the PKCE verifier), and the returned
**id_token** is what signs the caller in. It must pass the instance's own verifier on its JWKS path
(issuer `jwks_issuer`, audience `jwks_audience`, the claims sub, org, role, iat, exp, aud, iss, jti),
carry this flow's nonce, and then becomes the session cookie's token, verified again on every request
like any other. The access token is never used: it may be opaque, and its audience is the provider's
business, not this console's.

The flow cookie is SameSite=Lax, unlike the session's Strict one: the provider's redirect back is a
cross-site top-level GET, on which a Strict cookie would not come. It needs no signature: every value
in it is only compared with what the provider sends back, and a code is useless without the verifier.
For the same reason a Strict session cookie set at the end of that cross-site chain may not be sent on
an immediate redirect, so the callback answers with a small page that moves on by itself (a meta
refresh, no script), and the next navigation is same-site.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import jwt
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from sandbox.api.console import auth, session
from sandbox.api.console.pages import COMMON_HEADERS, render
from sandbox.api.problems import record_refusal
from sandbox.auth.tokens import Principal
from sandbox.config import Settings
from sandbox.errors import NotFound, SandboxError, Unauthorized
from sandbox.instance import Instance
from sandbox.logs import get_logger
from sandbox.security_log import bounded

router = APIRouter(prefix="/console/oidc", tags=["console"])
log = get_logger("sandbox.console.oidc")

FLOW_COOKIE = "sandbox_console_oidc"
FLOW_PATH = "/console/oidc"
FLOW_TTL_S = 600  # time to sign in at the provider
TOKEN_TIMEOUT_S = 5.0
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
MAX_CODE_CHARS = 4096
# Browsers drop a cookie over 4096 bytes without a word; the session cookie holds the whole id_token.
MAX_SESSION_TOKEN_CHARS = 3800
EXPIRED = "this sign-in expired or was started in another browser; start again from the sign-in page"


class ProviderUnavailable(SandboxError):
    """The identity provider could not be asked, or answered something unusable: not the caller's fault."""

    status = 502
    title = "Identity provider unavailable"
    slug = "identity-provider-unavailable"


@dataclass(frozen=True)
class Provider:
    """The configured OpenID Connect client."""

    name: str
    authorize_url: str
    token_url: str
    client_id: str
    client_secret: str | None
    scopes: str
    redirect_url: str | None
    issuer: str


@dataclass(frozen=True)
class Flow:
    """One browser's sign-in in progress, as kept in its flow cookie."""

    state: str
    nonce: str
    verifier: str
    next_page: str


def provider_from(settings: Settings) -> Provider | None:
    """The provider when it is fully configured (its id_tokens must also verify through the jwks_* settings)."""
    if not (settings.oidc_authorize_url and settings.oidc_token_url and settings.oidc_client_id):
        return None
    if not (settings.jwks_url and settings.jwks_issuer):
        return None
    secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else None
    return Provider(name=settings.oidc_name, authorize_url=settings.oidc_authorize_url,
                    token_url=settings.oidc_token_url, client_id=settings.oidc_client_id, client_secret=secret or None,
                    scopes=settings.oidc_scopes, redirect_url=settings.oidc_redirect_url,
                    issuer=settings.jwks_issuer)


def install(app: FastAPI) -> None:
    """Add the flow's routes, and offer the provider on the sign-in page when it is configured."""
    app.include_router(router)
    instance: Instance = app.state.instance
    provider = provider_from(instance.settings)
    offered: list[dict[str, str]] = list(getattr(app.state, "console_providers", []))
    if provider is not None:
        offered.append({"name": provider.name, "href": f"{FLOW_PATH}/start"})
    elif instance.settings.oidc_authorize_url or instance.settings.oidc_client_id:
        log.warning("oidc_not_offered", reason="the oidc_authorize_url, oidc_token_url, oidc_client_id, jwks_url "
                                               "and jwks_issuer settings are needed together")
    app.state.console_providers = offered


def _provider(request: Request) -> Provider:
    instance: Instance = request.app.state.instance
    provider = provider_from(instance.settings)
    if provider is None:
        raise NotFound("this console offers no identity provider; sign in with a token")
    return provider


def _redirect_url(request: Request, provider: Provider) -> str:
    if provider.redirect_url:
        return provider.redirect_url
    instance: Instance = request.app.state.instance
    base = instance.settings.public_url or str(request.base_url)
    return f"{base.rstrip('/')}{FLOW_PATH}/callback"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: the provider keeps this, the token request proves the verifier behind it."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def _same(submitted: str, expected: str) -> bool:
    # compare_digest refuses non-ASCII str; a hostile query or claim must be a mismatch, not a 500.
    return hmac.compare_digest(submitted.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def _encode_flow(flow: Flow) -> str:
    payload = {"state": flow.state, "nonce": flow.nonce, "verifier": flow.verifier, "next": flow.next_page}
    return _b64url(json.dumps(payload, separators=(",", ":")).encode())


def _decode_flow(value: str | None) -> Flow:
    if not value or len(value) > 2048:
        raise Unauthorized(EXPIRED)
    try:
        payload = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        fields = [payload["state"], payload["nonce"], payload["verifier"], payload["next"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise Unauthorized(EXPIRED) from exc
    if not all(isinstance(field, str) and field for field in fields):
        raise Unauthorized(EXPIRED)
    state, nonce, verifier, next_page = fields
    return Flow(state=state, nonce=nonce, verifier=verifier, next_page=auth.safe_next(next_page))


def _set_flow_cookie(request: Request, response: Response, flow: Flow) -> None:
    response.set_cookie(FLOW_COOKIE, _encode_flow(flow), max_age=FLOW_TTL_S, path=FLOW_PATH, httponly=True,
                        samesite="lax", secure=session.secure_cookies(request))


def _clear_flow_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(FLOW_COOKIE, path=FLOW_PATH, httponly=True, samesite="lax",
                           secure=session.secure_cookies(request))


@router.get("/start", include_in_schema=False)
def start(request: Request, next: str | None = None) -> Response:
    """Send the browser to the provider's sign-in, remembering this flow in its cookie."""
    provider = _provider(request)
    flow = Flow(state=secrets.token_urlsafe(32), nonce=secrets.token_urlsafe(32),
                verifier=secrets.token_urlsafe(48), next_page=auth.safe_next(next))
    query = urlencode({"response_type": "code", "client_id": provider.client_id,
                       "redirect_uri": _redirect_url(request, provider), "scope": provider.scopes,
                       "state": flow.state, "nonce": flow.nonce, "code_challenge": pkce_challenge(flow.verifier),
                       "code_challenge_method": "S256"})
    separator = "&" if "?" in provider.authorize_url else "?"
    response = RedirectResponse(f"{provider.authorize_url}{separator}{query}", status_code=302,
                                headers=COMMON_HEADERS)
    _set_flow_cookie(request, response, flow)
    return response


@router.get("/callback", response_class=HTMLResponse, include_in_schema=False)
async def callback(request: Request, code: str | None = None, state: str | None = None,
                   error: str | None = None) -> Response:
    """The provider's answer: check it, exchange the code, verify the id_token, and sign the caller in."""
    instance: Instance = request.app.state.instance
    try:
        provider = _provider(request)
        if error is not None:
            raise Unauthorized(f"the identity provider did not sign you in ({bounded(error, 64)})")
        flow = _decode_flow(request.cookies.get(FLOW_COOKIE))
        if not state or not _same(state, flow.state):
            raise Unauthorized("the sign-in's state does not match this browser's; start again from the sign-in page")
        if not code or len(code) > MAX_CODE_CHARS:
            raise Unauthorized("the identity provider sent no usable authorization code")
        redirect_url = _redirect_url(request, provider)
        token, principal = await run_in_threadpool(_signed_in_token, instance, provider, flow, code, redirect_url)
        redirect = await run_in_threadpool(auth.signed_in_response, request, token, principal, flow.next_page)
    except SandboxError as refused:
        return await _refused(request, refused)
    target = redirect.headers["location"]
    response = render(request, "oidc_signed_in.html", principal=principal, target=target)
    for cookie in redirect.headers.getlist("set-cookie"):
        response.headers.append("set-cookie", cookie)
    _clear_flow_cookie(request, response)
    return response


async def _refused(request: Request, refused: SandboxError) -> Response:
    """An error page, no session, and the flow spent; recorded like any refusal of an unidentified caller."""
    await record_refusal(request, refused)  # a 401 goes to the security log
    if refused.status >= 500:
        log.warning("oidc_sign_in_failed", status=refused.status, detail=bounded(refused.detail))
    response = render(request, "oidc_error.html", status=refused.status, principal=None, title=refused.title,
                      detail=refused.detail)
    _clear_flow_cookie(request, response)
    return response


def _signed_in_token(instance: Instance, provider: Provider, flow: Flow, code: str,
                     redirect_url: str) -> tuple[str, Principal]:
    token = exchange_code(provider, code=code, verifier=flow.verifier, redirect_url=redirect_url)
    return token, verify_id_token(instance, provider, token, nonce=flow.nonce)


def exchange_code(provider: Provider, *, code: str, verifier: str, redirect_url: str) -> str:
    """The id_token the token endpoint gives for `code` (RFC 6749 4.1.3, client_secret_basic, PKCE)."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_url, "code_verifier": verifier}
    credentials: httpx.BasicAuth | None = None
    if provider.client_secret:
        # RFC 6749 2.3.1: both halves are form-encoded before the Basic scheme's base64.
        credentials = httpx.BasicAuth(quote(provider.client_id, safe=""), quote(provider.client_secret, safe=""))
    else:
        form["client_id"] = provider.client_id  # a public client: PKCE is its only proof
    status, body = _post_form(provider.token_url, form, credentials)
    try:
        document: Any = json.loads(body)
    except ValueError:
        document = None
    if status == 400:
        # invalid_grant and friends: the code is spent, expired or not this flow's (RFC 6749 5.2).
        reason = document.get("error") if isinstance(document, dict) else None
        raise Unauthorized(f"the identity provider refused the sign-in code ({bounded(reason or 'no reason', 64)})")
    if status != 200:
        raise ProviderUnavailable(f"the identity provider's token endpoint answered HTTP {status}; try again later")
    id_token = document.get("id_token") if isinstance(document, dict) else None
    if not isinstance(id_token, str) or not id_token:
        raise ProviderUnavailable("the identity provider sent no id_token (is the 'openid' scope requested?)")
    if len(id_token) > MAX_SESSION_TOKEN_CHARS:
        raise ProviderUnavailable(f"the identity provider's id_token is longer than {MAX_SESSION_TOKEN_CHARS} "
                                  "characters, too long for the session cookie")
    return id_token


def _post_form(url: str, form: dict[str, str], credentials: httpx.BasicAuth | None) -> tuple[int, bytes]:
    """POST a form with a bounded answer in size and time; no redirects."""
    body = bytearray()
    deadline = time.monotonic() + TOKEN_TIMEOUT_S  # httpx times each read; a slow drip must not outlast this
    try:
        with httpx.Client(timeout=TOKEN_TIMEOUT_S, follow_redirects=False) as client, \
                client.stream("POST", url, data=form, auth=credentials,
                              headers={"Accept": "application/json"}) as answer:
            for chunk in answer.iter_bytes():
                body.extend(chunk)
                if len(body) > MAX_TOKEN_RESPONSE_BYTES or time.monotonic() > deadline:
                    raise ProviderUnavailable("the identity provider's token answer is too large or too slow")
            return answer.status_code, bytes(body)
    except httpx.HTTPError as exc:
        raise ProviderUnavailable("the identity provider's token endpoint could not be reached; try again later") \
            from exc


def verify_id_token(instance: Instance, provider: Provider, token: str, *, nonce: str) -> Principal:
    """The caller an id_token names, when it is the provider's, for this client and this very flow."""
    principal = instance.verifier.verify(token)
    if principal.issuer != provider.issuer:
        # The verifier also accepts the instance's own tokens; a token endpoint must not hand out one of those.
        raise Unauthorized("the token was not issued by the identity provider")
    claims = jwt.decode(token, options={"verify_signature": False})  # its signature was verified just above
    claimed_nonce = claims.get("nonce")
    if not isinstance(claimed_nonce, str) or not _same(claimed_nonce, nonce):
        raise Unauthorized("the token's nonce does not belong to this sign-in")
    authorized_party = claims.get("azp")
    if authorized_party is not None and authorized_party != provider.client_id:
        raise Unauthorized("the token was issued to another client of the identity provider")
    if instance.is_revoked(principal.jti):
        raise Unauthorized("this token was revoked")
    return principal
