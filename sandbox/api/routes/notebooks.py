"""Notebook sessions: a buyer starts (or reuses) a Jupyter server for a contract and dataset, and exports files.

This process keeps the sessions (store rows, tokens); the worker runs their servers and reads their
workspaces. Starting a session wakes an embedded worker and returns at once: the proxy waits for the
server on first use. Stopping one ends it in the store and waits (a while) for the worker's teardown.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from sandbox.api import schemas
from sandbox.api.deps import Buyer, InstanceDep, PrincipalDep
from sandbox.api.routes.jobs import wake_worker
from sandbox.auth.tokens import Principal, Role
from sandbox.instance import Instance
from sandbox.notebooks import sessions
from sandbox.notebooks.endpoint import server_dir
from sandbox.worker_socket import ask_worker, principal_body

router = APIRouter(prefix="/v1", tags=["notebooks"])

EXPORT_TIMEOUT_S = 300.0  # the first export of a version may build its fingerprints
# How long a stop waits for the worker to take the server down (kernels stopped and metered, workspace gone);
# `app.state.notebook_teardown_wait_s` may say otherwise.
TEARDOWN_WAIT_S = 30.0


class NotebookRequest(BaseModel):
    contract: str = Field(min_length=1, max_length=40)
    dataset: str = Field(min_length=1, max_length=64)
    version: int | None = Field(default=None, ge=1)


class ExportRequest(BaseModel):
    path: str = Field(min_length=1, max_length=500)


def _url(request: Request, instance: Instance, job_id: str) -> str:
    base = instance.settings.public_url or str(request.base_url).rstrip("/")
    return f"{base.rstrip('/')}/notebooks/{job_id}/"


def _start(instance: Instance, buyer: Principal, body: NotebookRequest) -> tuple[str, str]:
    with instance.context(buyer) as ctx:
        return sessions.open_session(ctx, contract_id=body.contract, dataset=body.dataset, version=body.version)


def _stop(instance: Instance, principal: Principal, identifier: str) -> str:
    with instance.context(principal) as ctx:
        job = sessions.get_session(ctx, identifier)
        job = sessions.stop_session(ctx, job.id, signer=instance.signing_key)
        ctx.record("notebook.stop", "job", job.id, reason="stopped")
        return job.id


def _view(instance: Instance, principal: Principal, identifier: str, **shown: Any) -> dict[str, Any]:
    with instance.read_context(principal) as ctx:
        return sessions.session_view(sessions.get_session(ctx, identifier), steward=principal.role is Role.STEWARD,
                                     **shown)


@router.post("/notebooks", status_code=201, response_model=schemas.NotebookSession, response_model_exclude_unset=True)
async def start_notebook(body: NotebookRequest, request: Request, instance: InstanceDep,
                         buyer: Buyer) -> dict[str, Any]:
    """Start or reuse the buyer's Jupyter server for (contract, dataset): its URL and a new session token."""
    identifier, token = await run_in_threadpool(_start, instance, buyer, body)
    wake_worker(request)
    url = _url(request, instance, identifier)
    view = await run_in_threadpool(_view, instance, buyer, identifier, url=url, token=token)
    # A browser opens this once: the proxy swaps the token for a cookie and drops it from the address.
    view["lab_url"] = f"{url}lab?token={token}"
    return view


@router.get("/notebooks", response_model=list[schemas.NotebookSession], response_model_exclude_unset=True)
def list_notebooks(instance: InstanceDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    with instance.read_context(principal) as ctx:
        steward = principal.role is Role.STEWARD
        return [sessions.session_view(job, steward=steward) for job in sessions.list_sessions(ctx)]


@router.get("/notebooks/{identifier}", response_model=schemas.NotebookSession, response_model_exclude_unset=True)
def get_notebook(identifier: str, instance: InstanceDep, principal: PrincipalDep) -> dict[str, Any]:
    return _view(instance, principal, identifier)


@router.delete("/notebooks/{identifier}", response_model=schemas.NotebookSession, response_model_exclude_unset=True)
async def stop_notebook(identifier: str, request: Request, instance: InstanceDep, buyer: Buyer) -> dict[str, Any]:
    """Stop the session: the worker ends its kernels and deletes its workspace; exports stay in review."""
    identifier = await run_in_threadpool(_stop, instance, buyer, identifier)
    wake_worker(request)
    # The answer carries the kernels' final usage when the worker is quick about it; it is recorded either way.
    folder = server_dir(instance.settings, instance.instance_id, identifier)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + float(getattr(request.app.state, "notebook_teardown_wait_s", TEARDOWN_WAIT_S))
    while folder.exists() and loop.time() < deadline:
        await asyncio.sleep(0.2)
    return await run_in_threadpool(_view, instance, buyer, identifier)


@router.post("/notebooks/{identifier}/exports", status_code=201, response_model=schemas.OutputView,
             response_model_exclude_unset=True)
async def export(identifier: str, body: ExportRequest, instance: InstanceDep, buyer: Buyer) -> dict[str, Any]:
    """Ask for a workspace file to leave: the worker checks it, and it waits for a steward's review."""

    def run() -> dict[str, Any]:
        with instance.read_context(buyer) as ctx:
            sessions.exportable_session(ctx, identifier)
        answer = ask_worker(instance, sessions.EXPORT_ROUTE, {"principal": principal_body(buyer),
                                                              "session": identifier, "path": body.path},
                            timeout_s=EXPORT_TIMEOUT_S, what="exporting a notebook file")
        output: dict[str, Any] = answer["output"]
        return output

    return await run_in_threadpool(run)
