"""Notebook sessions: a buyer starts (or reuses) a Jupyter server for a contract and dataset, and exports files."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from sandbox.api.deps import Buyer, InstanceDep, PrincipalDep
from sandbox.auth.tokens import Principal, Role
from sandbox.errors import NotFound
from sandbox.instance import Instance
from sandbox.notebooks import sessions
from sandbox.notebooks.servers import NotebookServers
from sandbox.release.review import output_view

router = APIRouter(prefix="/v1", tags=["notebooks"])


class NotebookRequest(BaseModel):
    contract: str = Field(min_length=1, max_length=40)
    dataset: str = Field(min_length=1, max_length=64)
    version: int | None = Field(default=None, ge=1)


class ExportRequest(BaseModel):
    path: str = Field(min_length=1, max_length=500)


def _servers(request: Request) -> NotebookServers:
    servers: NotebookServers | None = getattr(request.app.state, "notebooks", None)
    if servers is None:
        raise NotFound("this service process runs no notebooks (it has no Docker engine)")
    return servers


def _url(request: Request, instance: Instance, job_id: str) -> str:
    base = instance.settings.public_url or str(request.base_url).rstrip("/")
    return f"{base.rstrip('/')}/notebooks/{job_id}/"


def _start(instance: Instance, servers: NotebookServers, buyer: Principal, body: NotebookRequest) -> tuple[str, str]:
    with instance.context(buyer) as ctx:
        job, _ = sessions.start_session(ctx, contract_id=body.contract, dataset=body.dataset, version=body.version)
        token = sessions.issue_session_token(ctx, job, buyer)
        identifier = job.id
    try:
        servers.ensure(identifier)
    except Exception:
        _stop(instance, servers, buyer, identifier, reason="failed to start")
        raise
    return identifier, token


def _stop(instance: Instance, servers: NotebookServers, principal: Principal, identifier: str,
          reason: str = "stopped") -> dict[str, Any]:
    with instance.context(principal) as ctx:
        job = sessions.get_session(ctx, identifier)
        job = sessions.stop_session(ctx, job.id, signer=instance.signing_key, reason=reason)
        ctx.record("notebook.stop", "job", job.id, reason=reason)
        view = sessions.session_view(job)
    servers.stop(identifier)
    return view


@router.post("/notebooks", status_code=201)
async def start_notebook(body: NotebookRequest, request: Request, instance: InstanceDep,
                         buyer: Buyer) -> dict[str, Any]:
    """Start or reuse the buyer's Jupyter server for (contract, dataset): its URL and a new session token."""
    servers = _servers(request)
    identifier, token = await run_in_threadpool(_start, instance, servers, buyer, body)
    with instance.read_context(buyer) as ctx:
        job = sessions.get_session(ctx, identifier)
        return sessions.session_view(job, url=_url(request, instance, identifier), token=token)


@router.get("/notebooks")
def list_notebooks(instance: InstanceDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    with instance.read_context(principal) as ctx:
        steward = principal.role is Role.STEWARD
        return [sessions.session_view(job, steward=steward) for job in sessions.list_sessions(ctx)]


@router.get("/notebooks/{identifier}")
def get_notebook(identifier: str, instance: InstanceDep, principal: PrincipalDep) -> dict[str, Any]:
    with instance.read_context(principal) as ctx:
        return sessions.session_view(sessions.get_session(ctx, identifier), steward=principal.role is Role.STEWARD)


@router.delete("/notebooks/{identifier}")
async def stop_notebook(identifier: str, request: Request, instance: InstanceDep, buyer: Buyer) -> dict[str, Any]:
    """Stop the session: its kernels end, its workspace is deleted; exports stay in review."""
    return await run_in_threadpool(_stop, instance, _servers(request), buyer, identifier)


@router.post("/notebooks/{identifier}/exports", status_code=201)
async def export(identifier: str, body: ExportRequest, request: Request, instance: InstanceDep,
                 buyer: Buyer) -> dict[str, Any]:
    """Ask for a workspace file to leave: it is checked and waits for a steward's review."""
    servers = _servers(request)

    def run() -> dict[str, Any]:
        with instance.context(buyer) as ctx:
            output = sessions.export_file(ctx, identifier, body.path, workspace=servers.workspace(identifier))
            return output_view(output, steward=False)

    return await run_in_threadpool(run)
