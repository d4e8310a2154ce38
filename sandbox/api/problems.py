"""Every error leaves as RFC 9457 problem+json; never a stack trace."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection

from sandbox.auth.tokens import Principal
from sandbox.errors import SandboxError
from sandbox.logs import get_logger
from sandbox.security_log import SecurityLog, audit_refusal, mark_recorded, was_recorded

PROBLEM_TYPE_BASE = "https://sandbox.invalid/problems/"
# Where RequestContextMiddleware leaves the request id in the ASGI scope's state.
REQUEST_ID_STATE = "request_id"
# Where `sandbox.api.deps.get_principal` leaves the verified caller, for the refusal records below.
PRINCIPAL_STATE = "principal"
log = get_logger("sandbox.api")

_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
           405: "Method not allowed", 409: "Conflict", 413: "Payload too large", 415: "Unsupported media type",
           422: "Invalid request", 429: "Too many requests", 500: "Internal error"}


_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def problem(status: int, detail: str, *, slug: str | None = None, title: str | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    title = title or _TITLES.get(status, "Error")
    body = {
        "type": PROBLEM_TYPE_BASE + (slug or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="sandbox"'}
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only where and why; echoing `input` back could repeat a secret or a data value.
    return [
        {"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", "")),
         "type": str(error.get("type", ""))}
        for error in exc.errors()
    ]


def _route(connection: HTTPConnection) -> str:
    route = connection.scope.get("route")
    return str(getattr(route, "path", None) or "unmatched")


def _object_of(connection: HTTPConnection, error: SandboxError) -> str:
    """What the refused call was about: the error's own `object`, else the path's parameters."""
    named = error.extra.get("object")
    if named:
        return str(named)
    return "/".join(str(value) for value in connection.path_params.values()) or "-"


async def record_refusal(connection: HTTPConnection, error: SandboxError) -> None:
    """Record a refusal once: an identified caller's 403 or 404 on the audit chain, an unidentified
    caller's 401, 403 or 404 in the rate-limited security log, never the chain (review 11.11)."""
    if error.status not in (401, 403, 404) or was_recorded(error):
        return
    mark_recorded(error)
    principal = getattr(connection.state, PRINCIPAL_STATE, None)
    method = connection.scope.get("method", "WEBSOCKET")
    if isinstance(principal, Principal) and error.status != 401:
        await run_in_threadpool(audit_refusal, connection.app.state.instance, principal, status=error.status,
                                method=method, route=_route(connection), object_id=_object_of(connection, error),
                                reason=error.detail)
        return
    security_log: SecurityLog = connection.app.state.security_log
    security_log.refusal(client=connection.client.host if connection.client else None, status=error.status,
                         method=method, path=connection.url.path, reason=error.detail)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(SandboxError)
    async def _sandbox_error(request: Request, exc: SandboxError) -> JSONResponse:
        await record_refusal(request, exc)
        return problem(exc.status, exc.detail, slug=exc.slug, title=exc.title,
                       headers=getattr(exc, "headers", None), **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
        return problem(422, f"the request is malformed: {summary}", slug="invalid", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail) if exc.detail else _TITLES.get(exc.status_code, "Error")
        if exc.status_code == 400 and exc.__cause__ is not None and detail == _FASTAPI_BODY_ERROR:
            # FastAPI calls a body it cannot decode (say, invalid UTF-8) a 400; it is a malformed body.
            return problem(422, "the request body is not valid JSON", slug="invalid")
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        return problem(exc.status_code, detail, headers=getattr(exc, "headers", None))

    # Bad input that surfaces below the validation layer, as a class rather than route by route (review
    # 11.16): an integer past 2^63 reaching SQLite, a date whose UTC form leaves datetime's range, nesting
    # deep enough to exhaust a recursive parser, a value PostgreSQL refuses. Each is the caller's error.
    @app.exception_handler(OverflowError)
    async def _out_of_range(request: Request, exc: OverflowError) -> JSONResponse:
        log.warning("input_out_of_range", path=request.url.path, error=str(exc)[:200])
        return problem(422, "a number or date in the request is out of range", slug="invalid")

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        log.warning("input_too_deep", path=request.url.path)
        return problem(422, "the request is nested too deeply", slug="invalid")

    @app.exception_handler(DataError)
    async def _refused_by_store(request: Request, exc: DataError) -> JSONResponse:
        log.warning("input_refused_by_store", path=request.url.path, error=str(exc.orig)[:200])
        return problem(422, "a value in the request is out of range", slug="invalid")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", path=request.url.path, error_type=type(exc).__name__, exc_info=exc)
        # This answer is sent from outside the request-id middleware, so it sets the header itself.
        request_id = getattr(request.state, REQUEST_ID_STATE, None)
        headers = {"x-request-id": request_id} if request_id else None
        return problem(500, "the service failed to handle this request; it has been logged", headers=headers)
