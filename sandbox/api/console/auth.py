"""Signing in and out of the console, and its home page."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from sandbox.api.console import session
from sandbox.api.console.pages import render
from sandbox.api.console.session import ConsoleUser
from sandbox.auth.tokens import Principal, Role
from sandbox.errors import Unauthorized
from sandbox.instance import Instance
from sandbox.jobs import service

router = APIRouter(prefix="/console", tags=["console"])

# Where a sign-in may return to: a console page, never another host (`//evil`) or a scheme.
_NEXT = re.compile(r"^/console/[A-Za-z0-9/_.~%-]*$")
MAX_TOKEN_CHARS = 16_384


def safe_next(value: str | None) -> str:
    return value if value and _NEXT.match(value) and "//" not in value else "/console/"


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request, next: str | None = None) -> Response:
    nonce = session.new_login_nonce()
    providers: list[dict[str, str]] = list(getattr(request.app.state, "console_providers", []))
    response = render(request, "login.html", principal=None, nonce=nonce, next=safe_next(next), error=None,
                      providers=providers)
    session.set_cookie(request, response, session.LOGIN_COOKIE, nonce, max_age=3600)
    return response


@router.post("/login", response_class=HTMLResponse, include_in_schema=False)
def login(request: Request, token: Annotated[str, Form(max_length=MAX_TOKEN_CHARS)] = "",
          nonce: Annotated[str, Form(max_length=200)] = "",
          next: Annotated[str, Form(max_length=500)] = "") -> Response:
    session.check_login_nonce(request, nonce)
    instance: Instance = request.app.state.instance
    token = token.strip()
    try:
        if not token:
            raise Unauthorized("paste a token to sign in")
        principal = instance.verifier.verify(token)
        if instance.is_revoked(principal.jti):
            raise Unauthorized("this token was revoked")
    except Unauthorized as refused:
        fresh = session.new_login_nonce()
        response = render(request, "login.html", status=401, principal=None, nonce=fresh, next=safe_next(next),
                          error=f"Not signed in: {refused.detail}",
                          providers=list(getattr(request.app.state, "console_providers", [])))
        session.set_cookie(request, response, session.LOGIN_COOKIE, fresh, max_age=3600)
        return response
    return signed_in_response(request, token, principal, next)


def signed_in_response(request: Request, token: str, principal: Principal, next_page: str | None) -> Response:
    """Record the sign-in and set the session cookie (also the identity provider's callback's answer)."""
    instance: Instance = request.app.state.instance
    with instance.context(principal) as ctx:
        ctx.record("console.sign_in", "principal", principal.actor, issuer=principal.issuer)
    response = RedirectResponse(safe_next(next_page), status_code=303)
    session.start_session(request, response, token, principal)
    return response


@router.post("/logout", include_in_schema=False)
def logout(request: Request, principal: ConsoleUser,
           csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    session.check_csrf(request, principal, csrf)
    response = RedirectResponse("/console/login?notice=signed-out", status_code=303)
    session.end_session(response)
    return response


@router.get("/", response_class=HTMLResponse,
            responses={200: {"content": {"text/html": {"schema": {"type": "string"}}},
                             "description": "the web console's home page"}})
async def home(request: Request, principal: ConsoleUser) -> Response:
    """The web console (HTML): what waits for the signed-in user."""
    instance: Instance = request.app.state.instance
    summary = await run_in_threadpool(_summary, instance, principal)
    return render(request, "home.html", principal=principal, summary=summary)


def _summary(instance: Instance, principal: Principal) -> dict[str, Any]:
    with instance.read_context(principal) as ctx:
        if principal.role is Role.STEWARD:
            pending = [j for j in service.list_jobs(ctx, state="pending_approval", limit=1000)
                       if j.buyer_org != principal.org]
            return {"approvals": len(pending), "reviews": len(service.review_queue(ctx))}
        if principal.role is Role.BUYER:
            jobs = service.list_jobs(ctx, limit=10)
            return {"jobs": [service.job_view(j, steward=False) for j in jobs]}
        return {}
