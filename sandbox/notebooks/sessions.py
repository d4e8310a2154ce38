"""Notebook sessions in the store: a session is a job of kind `notebook`, running until it is stopped.

The API process starts and stops sessions here, in the store only; the worker follows: it runs a server
for each running session and tears it down once the session ended (`servers`). A session's usage (kernel
CPU and wall time) counts against the contract like any job's, and files exported from its workspace,
and outputs the filter withheld for review, are its outputs: the review queue, the report and the signed
download work on them as on any job's.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from sandbox.auth.tokens import Principal, Role
from sandbox.catalog.service import get_version
from sandbox.context import Context
from sandbox.contracts import JobKind, Tier, Use, get_contract, require_usable, usability_problems
from sandbox.dp.mock_publication import find_mock
from sandbox.errors import Conflict, Forbidden, NotFound
from sandbox.jobs.lifecycle import JobState
from sandbox.jobs.mounts import NOT_MOUNTED
from sandbox.jobs.service import (
    buyer_usage,
    get_job,
    job_id,
    move,
    settle_review,
    usage_totals,
    visible_jobs,
)
from sandbox.notebooks.spec import notebook_settings
from sandbox.policies import get_policy_version
from sandbox.release.review import outputs_view, sign_manifest
from sandbox.store.models import ImageRecord, Job, NotebookToken
from sandbox.transitions import apply_transition

KERNEL_IMAGE = "notebook"  # the policy's name for kernel images
KERNEL_IMAGE_BUILD = "analysis"  # the built image that carries ipykernel
EXPORT_ROUTE = "/notebooks/export"  # where the worker's local service takes exports (`exports`)

S = JobState
# The part of the job lifecycle a session goes through (docs/state-diagrams.md draws it). A session starts
# running; stopping it checks it and puts it in review at once, and it is done once nothing of it waits
# for a steward. A buyer or steward may cancel it (`jobs.service.cancel_job`) while it runs or waits.
SESSION_START = S.RUNNING
SESSION_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.RUNNING: frozenset({S.CHECKING, S.CANCELLED}),
    S.CHECKING: frozenset({S.IN_REVIEW}),
    S.IN_REVIEW: frozenset({S.DONE, S.CANCELLED}),
    S.DONE: frozenset(),
    S.CANCELLED: frozenset(),
}


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def kernel_image_id(ctx: Context) -> str:
    """The kernel image's id, as a worker published it (`Worker.refresh_images`)."""
    record = ctx.session.get(ImageRecord, KERNEL_IMAGE_BUILD)
    if record is None:
        raise Conflict(f"no worker has published the kernel image ({KERNEL_IMAGE_BUILD}) yet; the operator builds "
                       "it with `sandbox images build` and runs `sandbox worker`, which publishes it")
    return record.image_id


def _move_session(ctx: Context, job: Job, target: JobState, reason: str | None = None) -> None:
    """One step of the session's lifecycle (SESSION_TRANSITIONS), applied to the job as any job's move."""
    apply_transition(SESSION_TRANSITIONS, JobState(job.state), target, noun="notebook session")
    move(ctx, job, target, reason=reason)


def start_session(ctx: Context, *, contract_id: str, dataset: str, version: int | None = None) -> tuple[Job, bool]:
    """The buyer's running session for (contract, dataset), or a new one; and whether it is new."""
    buyer = ctx.require_role(Role.BUYER)
    contract = require_usable(ctx, contract_id, kind=JobKind.NOTEBOOK, dataset=dataset)
    existing = ctx.session.execute(select(Job).where(
        Job.kind == JobKind.NOTEBOOK.value, Job.state == JobState.RUNNING.value, Job.contract_id == contract.id,
        Job.dataset == dataset, Job.buyer_org == buyer.org).order_by(Job.created_at)).scalars().first()
    if existing is not None and (version is None or existing.dataset_version == version):
        return existing, False
    chosen = get_version(ctx.session, dataset, version)
    if contract.tier == Tier.DP_ONLY.value and find_mock(ctx.session, chosen) is None:
        raise Conflict(f"dp_only notebooks run on the DP mock, and {dataset}@{chosen.version} has none yet; "
                       "a steward publishes it")
    policy = get_policy_version(ctx.session, contract.policy_name, contract.policy_version)
    if KERNEL_IMAGE not in policy.body["runtime"]["allowed_images"]:
        raise Forbidden(f"policy {policy.name}@{policy.version} does not allow notebook kernels", object=contract.id)
    quota_s = float(contract.quotas.get("cpu_hours", 0)) * 3600
    if usage_totals(ctx, contract.id)["cpu_seconds"] >= quota_s:
        raise Forbidden(f"contract {contract.id} has used its {contract.quotas.get('cpu_hours')} CPU-hours",
                        object=contract.id)
    settings = notebook_settings(policy.body)
    now = datetime.now(UTC)
    job = Job(
        id=job_id(), contract_id=contract.id, buyer_org=buyer.org, submitted_by=buyer.sub, dataset=dataset,
        dataset_version=chosen.version, kind=JobKind.NOTEBOOK.value, tier=contract.tier,
        policy=f"{policy.name}@{policy.version}", image=KERNEL_IMAGE, image_id=kernel_image_id(ctx),
        command=["jupyter-kernel"],
        resources={"cpus": float(settings["kernel_cpus"]), "memory_mb": int(settings["kernel_memory_mb"]),
                   "timeout_s": int(float(settings["max_kernel_hours"]) * 3600), "gpus": 0},
        code_sha256="", code_bytes=0, state=SESSION_START.value, reason="notebook session",
        usage={}, created_at=now, updated_at=now, started_at=now,
    )
    ctx.session.add(job)
    ctx.session.flush()
    ctx.record("notebook.start", "job", job.id, contract=contract.id, dataset=f"{dataset}@{chosen.version}",
               tier=contract.tier, image_id=job.image_id)
    return job, True


def issue_session_token(ctx: Context, job: Job, principal: Principal) -> str:
    """A new token for the session's server, valid no longer than the caller's own token and the contract."""
    contract = get_contract(ctx, job.contract_id)
    token = secrets.token_urlsafe(32)
    expires = min(principal.expires_at, contract.valid_until)
    ctx.session.add(NotebookToken(token_sha256=_hash(token), job_id=job.id, jti=principal.jti, sub=principal.sub,
                                  org=principal.org, expires_at=expires, created_at=datetime.now(UTC)))
    ctx.record("notebook.token.issue", "job", job.id, expires_at=expires.isoformat())
    return token


def open_session(ctx: Context, *, contract_id: str, dataset: str, version: int | None = None) -> tuple[str, str]:
    """Start or reuse the calling buyer's session (`start_session`) and issue it a new token: its id and token."""
    buyer = ctx.require_role(Role.BUYER)
    job, _ = start_session(ctx, contract_id=contract_id, dataset=dataset, version=version)
    return job.id, issue_session_token(ctx, job, buyer)


def session_access(ctx: Context, job_id_: str, *, token: str | None, principal: Principal | None) -> Job:
    """The running session that `token` (a session token) or `principal` (a service token) may use.

    Every failure looks the same to the caller, so that a guess learns nothing.
    """
    job = ctx.session.get(Job, job_id_)
    denied = Forbidden("no access to this notebook session", object=job_id_)
    if job is None or job.kind != JobKind.NOTEBOOK.value:
        raise denied
    now = datetime.now(UTC)
    if principal is not None:
        if principal.role is not Role.BUYER or principal.org != job.buyer_org:
            raise denied
        jti = principal.jti
    elif token:
        record = ctx.session.get(NotebookToken, _hash(token))
        if record is None or record.job_id != job.id or record.expires_at <= now:
            raise denied
        jti = record.jti
    else:
        raise denied
    from sandbox.store.models import RevokedToken

    if ctx.session.get(RevokedToken, jti) is not None:
        raise denied
    if job.state != JobState.RUNNING.value:
        raise Conflict(f"notebook session {job.id} is {job.state}")
    contract = get_contract(ctx, job.contract_id)
    problems = usability_problems(contract, Use(kind=JobKind.NOTEBOOK, dataset=job.dataset, org=job.buyer_org), now)
    if problems:
        raise Forbidden("; ".join(problems), object=job.id)
    return job


def session_token_expiry(ctx: Context, token: str) -> datetime:
    """When a session token (already checked by `session_access`) expires: a browser's cookie lasts no longer."""
    record = ctx.session.get(NotebookToken, _hash(token))
    if record is None:
        raise Forbidden("no access to this notebook session")
    return record.expires_at


def get_session(ctx: Context, identifier: str) -> Job:
    job = get_job(ctx, identifier)
    if job.kind != JobKind.NOTEBOOK.value:
        raise NotFound(f"no notebook session {identifier}")
    return job


def exportable_session(ctx: Context, identifier: str, *, for_update: bool = False) -> Job:
    """The calling buyer's running session, from which a workspace file may be exported."""
    buyer = ctx.require_role(Role.BUYER)
    job = get_job(ctx, identifier, for_update=for_update)
    if job.kind != JobKind.NOTEBOOK.value or job.buyer_org != buyer.org:
        raise NotFound(f"no notebook session {identifier}")
    if job.state != JobState.RUNNING.value:
        raise Conflict(f"notebook session {job.id} is {job.state}; exports are taken from a running session")
    return job


def list_sessions(ctx: Context) -> list[Job]:
    ctx.require_role(Role.BUYER, Role.STEWARD)
    query = select(Job).where(Job.kind == JobKind.NOTEBOOK.value).order_by(Job.created_at.desc()).limit(200)
    return list(ctx.session.execute(visible_jobs(ctx, query)).scalars())


def stop_session(ctx: Context, identifier: str, *, signer: Any, reason: str = "stopped") -> Job:
    """End the session: exports still in review keep the job in review; otherwise it is done."""
    job = get_session(ctx, identifier)
    job = get_job(ctx, job.id, for_update=True)
    if job.state != JobState.RUNNING.value:
        return job
    job.exit_code = 0
    job.finished_at = datetime.now(UTC)
    _move_session(ctx, job, JobState.CHECKING, reason=f"notebook session {reason}")
    ctx.session.flush()
    ctx.session.refresh(job)
    sign_manifest(job, signer)
    _move_session(ctx, job, JobState.IN_REVIEW)
    settle_review(ctx, job)  # done once nothing waits for a steward (in the table: in_review -> done)
    return job


def session_view(job: Job, *, steward: bool = False, url: str | None = None,
                 token: str | None = None) -> dict[str, Any]:
    """A session as the caller may see it: a buyer sees its outputs as `job_view` shows them (unreleased
    files of the kernel's anonymous, since whether a check blocked one is a bit the kernel chose) and
    coarsened usage."""
    outputs = outputs_view(list(job.outputs), steward=steward)
    view: dict[str, Any] = {"id": job.id, "contract": job.contract_id, "dataset": job.dataset,
                            "version": job.dataset_version, "tier": job.tier, "state": job.state,
                            "usage": job.usage if steward else buyer_usage(job.usage),
                            "created_at": job.created_at.isoformat(),
                            "exports": [{"path": o["path"], "status": o["status"], "kind": o["kind"]} for o in outputs]}
    if job.reason.startswith(NOT_MOUNTED):
        view["notice"] = job.reason
    if url is not None:
        view["url"] = url
    if token is not None:
        view["token"] = token
    return view
