"""Rendering console pages: one Jinja2 environment (autoescaped), the security headers, and the error page.

Every page is rendered on the server; the only script is the console's own static file, so the
Content-Security-Policy allows no inline script at all. A value from a buyer (a file name, a
comment, a command) is text wherever it appears: Jinja2 escapes it.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined

from sandbox import __version__
from sandbox.api.console.session import csrf_token, signed_in
from sandbox.auth.tokens import Principal, Role
from sandbox.errors import SandboxError
from sandbox.instance import Instance

# No inline script or style anywhere: charts are SVG attributes, behaviour is /console/static/console.js.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "frame-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")
# Output files a steward looks at: nothing runs, nothing loads, and the frame is a unique opaque origin.
FILE_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox; frame-ancestors 'self'"

# `same-origin`, not `no-referrer`: under no-referrer a browser sends `Origin: null` with the console's own
# forms, and the origin check could not tell them from another site's.
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
                  "Cache-Control": "no-store", "Cross-Origin-Opener-Policy": "same-origin"}

_environment = Environment(loader=PackageLoader("sandbox.api.console", "templates"), autoescape=True,
                           undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)

# The sections each role sees in the navigation; the pages themselves check again.
NAVIGATION: dict[Role, list[tuple[str, str]]] = {
    Role.STEWARD: [("/console/", "Home"), ("/console/approvals", "Approvals"), ("/console/reviews", "Reviews"),
                   ("/console/datasets", "Datasets"), ("/console/contracts", "Contracts"),
                   ("/console/budgets", "Budgets"), ("/console/usage", "Usage"),
                   ("/console/invoices", "Invoices"), ("/console/audit", "Audit log")],
    Role.BUYER: [("/console/", "Home"), ("/console/contracts", "Contracts"), ("/console/jobs", "Jobs"),
                 ("/console/budgets", "Budgets"), ("/console/invoices", "Invoices"),
                 ("/console/notebooks", "Notebooks")],
    Role.AUDITOR: [("/console/", "Home"), ("/console/audit", "Audit log")],
    Role.ADMIN: [("/console/", "Home")],
}

NOTICES = {
    "approved": "The job is approved and queued.",
    "approved-waiting": "Your organisation's approval is recorded; the job waits for the other hospitals'.",
    "rejected": "The job is rejected.",
    "decided": "Your decision is recorded.",
    "signed-out": "You are signed out.",
}


def page_headers(policy: str = PAGE_POLICY) -> dict[str, str]:
    return {**COMMON_HEADERS, "Content-Security-Policy": policy, "X-Frame-Options": "DENY"}


def render(request: Request, template: str, *, status: int = 200, **values: Any) -> HTMLResponse:
    """A page for the signed-in caller (or nobody), with the console's headers."""
    instance: Instance = request.app.state.instance
    principal: Principal | None = values.pop("principal", None) or signed_in(request)
    notice = NOTICES.get(request.query_params.get("notice", ""))
    body = _environment.get_template(template).render(
        request_path=request.url.path, principal=principal, version=__version__, notice=notice,
        navigation=NAVIGATION.get(principal.role, []) if principal else [],
        csrf=csrf_token(instance, principal) if principal else "", **values)
    return HTMLResponse(body, status_code=status, headers=page_headers())


def error_page(request: Request, error: SandboxError) -> HTMLResponse:
    return render(request, "error.html", status=error.status, title=error.title, detail=error.detail)
