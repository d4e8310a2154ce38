"""The web console: server-rendered pages for stewards, buyers and auditors, in the API process.

The pages call the same service functions as the HTTP API with the signed-in caller's context, so
a page shows exactly what the API would answer that caller, and refuses what it would refuse.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from sandbox.api.console import auth, buyer, jobs, oidc, oversight
from sandbox.api.console.pages import COMMON_HEADERS, error_page
from sandbox.api.console.session import SignInRequired
from sandbox.api.problems import record_refusal
from sandbox.errors import SandboxError


class _ConsoleStatic(StaticFiles):
    async def get_response(self, path: str, scope: dict) -> Response:  # type: ignore[type-arg,override]
        response = await super().get_response(path, scope)
        response.headers.update({k: v for k, v in COMMON_HEADERS.items() if k != "Cache-Control"})
        return response


def install_console(app: FastAPI) -> None:
    """Add the console's routes, its static files, and HTML error pages for paths under /console."""
    for router in (auth.router, jobs.router, oversight.router, buyer.router):
        app.include_router(router)
    oidc.install(app)  # its routes, and the sign-in page's provider button when one is configured
    app.mount("/console/static", _ConsoleStatic(directory=Path(__file__).parent / "static"), name="console-static")
    api_handler = app.exception_handlers[SandboxError]

    async def sandbox_error(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith("/console/") or not isinstance(exc, SandboxError):
            answer = api_handler(request, exc)
            return await answer if inspect.isawaitable(answer) else answer
        if isinstance(exc, SignInRequired):
            target = request.url.path if request.method == "GET" else "/console/"
            return RedirectResponse(f"/console/login?next={target}", status_code=303)
        await record_refusal(request, exc)
        return error_page(request, exc)

    app.add_exception_handler(SandboxError, sandbox_error)
