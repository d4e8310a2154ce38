"""Buyer pages: their jobs, and their notebook sessions with a button that opens one in JupyterLab.

Budgets and invoices are the oversight pages, which show a buyer its own org's. Like the API, the job
and notebook lists also answer a steward (the jobs under contracts its org granted).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from sandbox import contracts
from sandbox.api.console.pages import render
from sandbox.api.console.session import ConsoleUser, check_csrf, require_role
from sandbox.api.routes.jobs import wake_worker
from sandbox.auth.tokens import Principal, Role
from sandbox.contracts import JobKind
from sandbox.instance import Instance
from sandbox.jobs import service
from sandbox.jobs.lifecycle import JobState
from sandbox.notebooks import sessions

router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)

JOB_PAGE = 100


def _instance(request: Request) -> Instance:
    instance: Instance = request.app.state.instance
    return instance


@router.get("/jobs", response_class=HTMLResponse)
async def jobs(request: Request, principal: ConsoleUser,
               state: str | None = Query(default=None, max_length=20)) -> Response:
    """The caller's jobs with their state, as `GET /v1/jobs` lists them, newest first."""
    views = await run_in_threadpool(_jobs, _instance(request), principal, state or None)
    return render(request, "buyer_jobs.html", principal=principal, jobs=views, state=state or "",
                  states=[s.value for s in JobState], limit=JOB_PAGE)


def _jobs(instance: Instance, principal: Principal, state: str | None) -> list[dict[str, Any]]:
    with instance.read_context(principal) as ctx:
        steward = principal.role is Role.STEWARD
        return [service.job_view(j, steward=steward) for j in service.list_jobs(ctx, state=state, limit=JOB_PAGE)]


@router.get("/notebooks", response_class=HTMLResponse)
async def notebooks(request: Request, principal: ConsoleUser) -> Response:
    """The caller's notebook sessions (`GET /v1/notebooks`) and, for a buyer, what it may open one on."""
    listed, openable = await run_in_threadpool(_notebooks, _instance(request), principal)
    return render(request, "buyer_notebooks.html", principal=principal, sessions=listed, openable=openable)


def _notebooks(instance: Instance, principal: Principal) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    with instance.read_context(principal) as ctx:
        steward = principal.role is Role.STEWARD
        listed = [sessions.session_view(job, steward=steward) for job in sessions.list_sessions(ctx)]
        if principal.role is not Role.BUYER:
            return listed, []
        # What `open_session` accepts: an active contract of the caller's org that allows notebooks.
        usable = [contracts.contract_view(c) for c in contracts.list_contracts(ctx)]
        openable = [{"contract": c["id"], "dataset": dataset, "tier": c["tier"], "valid_until": c["valid_until"]}
                    for c in usable if c["state"] == "active" and JobKind.NOTEBOOK.value in c["kinds"]
                    for dataset in c["datasets"]]
        return listed, openable


@router.post("/notebooks")
async def open_notebook(request: Request, principal: ConsoleUser,
                        contract: Annotated[str, Form(min_length=1, max_length=40)],
                        dataset: Annotated[str, Form(min_length=1, max_length=64)],
                        csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    """Start or reuse the buyer's session exactly as `POST /v1/notebooks` does, then open it in JupyterLab."""
    require_role(principal, Role.BUYER)
    check_csrf(request, principal, csrf)
    identifier, token = await run_in_threadpool(_open, _instance(request), principal, contract, dataset)
    wake_worker(request)
    # The proxy swaps the token for the notebook's cookie and takes it out of the address.
    return RedirectResponse(f"/notebooks/{quote(identifier)}/lab?token={quote(token)}", status_code=303)


def _open(instance: Instance, buyer: Principal, contract: str, dataset: str) -> tuple[str, str]:
    with instance.context(buyer) as ctx:
        return sessions.open_session(ctx, contract_id=contract, dataset=dataset)
