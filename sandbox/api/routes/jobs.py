"""Job endpoints: buyers submit and follow their jobs; stewards approve and review."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, Field, ValidationError

from runners.base import JOB_IMAGES
from sandbox.api import schemas
from sandbox.api.deps import Buyer, InstanceDep, PrincipalDep, Steward
from sandbox.api.schemas import Decision
from sandbox.api.uploads import receive_multipart
from sandbox.auth.tokens import Principal, Role
from sandbox.errors import Invalid, NotFound, TooManyRequests
from sandbox.jobs import service
from sandbox.jobs.bundles import StagedBundle, stage_bundle
from sandbox.jobs.quotas import require_org_quota
from sandbox.release import review
from sandbox.store.models import ImageRecord

router = APIRouter(prefix="/v1", tags=["jobs"])
MAX_BUNDLE_BYTES = 64 * 1024 * 1024


class ReviewDecision(BaseModel):
    release: list[str] = Field(default_factory=list, max_length=10_000)
    reject: list[str] = Field(default_factory=list, max_length=10_000)
    comment: str = Field(default="", max_length=5000)


@router.post("/jobs", status_code=201, response_model=schemas.JobCreated, response_model_exclude_unset=True)
async def submit_job(request: Request, instance: InstanceDep, buyer: Buyer) -> dict[str, Any]:
    settings = instance.settings
    upload = await receive_multipart(request, file_fields={"code"}, staging_dir=settings.tmp_dir,
                                     max_file_bytes=min(settings.max_upload_bytes, MAX_BUNDLE_BYTES))
    staged: StagedBundle | None = None
    try:
        if "spec" not in upload.fields or "code" not in upload.files:
            raise Invalid("a job needs a 'spec' part (JSON) and a 'code' part (tar.gz)")
        spec = parse_spec(upload.fields["spec"])
        code = upload.files["code"]
        with instance.read_session() as session:
            image = session.get(ImageRecord, spec.image_name)
        # An image the policy allows but no worker has published yet (a demo still building it): the job
        # waits in the queue and is pinned to the first image a worker publishes under that name.
        if image is None and spec.image_name not in JOB_IMAGES:
            raise Invalid(f"image {spec.image_name!r} is not available on the workers: jobs run in {list(JOB_IMAGES)}")
        image_id = image.image_id if image is not None else ""
        # Unpacked and checked before the transaction, so no writer waits on it; the transaction below
        # checks contract, policy and quotas and only moves the checked folder into place.
        staged = await run_in_threadpool(stage_bundle, code.path, sha256=code.sha256, staging_dir=settings.tmp_dir)
        bundle = staged

        def submit() -> dict[str, Any]:
            with instance.context(buyer) as ctx:
                require_org_quota(ctx, org=buyer.org, incoming_bytes=bundle.summary.expanded_bytes)
                job = service.submit_job(ctx, spec=spec, bundle=bundle, image_id=image_id)
                return {"id": job.id, "state": job.state, "image_id": job.image_id}

        created = await run_in_threadpool(submit)
        wake_worker(request)
        return created
    finally:
        upload.discard()
        if staged is not None:
            staged.discard()  # gone already once the job took it


# A spec is a small JSON object; nesting deeper than any real one is refused before it is parsed,
# since a 200,000-deep array made the JSON parser raise RecursionError (review 11.16).
MAX_SPEC_DEPTH = 32


def parse_spec(text: str) -> service.JobSpec:
    """The `spec` part as a JobSpec, or Invalid (422) with each problem."""
    if json_depth(text) > MAX_SPEC_DEPTH:
        raise Invalid(f"the job spec is nested more than {MAX_SPEC_DEPTH} levels deep")
    try:
        return service.JobSpec.model_validate(json.loads(text))
    except (ValueError, ValidationError, RecursionError) as exc:
        errors = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()] \
            if isinstance(exc, ValidationError) else [str(exc)[:200]]
        raise Invalid("the job spec is malformed", errors) from exc


def json_depth(text: str) -> int:
    """The deepest bracket nesting in a JSON text, brackets inside strings not counted. Linear."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def wake_worker(request: Request) -> None:
    """An embedded worker starts on new work at once; a separate one finds it on its next tick."""
    wake = getattr(request.app.state, "wake_worker", None)
    if wake is not None:
        wake()


@router.get("/jobs", response_model=list[schemas.JobView], response_model_exclude_unset=True)
def list_jobs(instance: InstanceDep, principal: PrincipalDep, state: str | None = Query(default=None, max_length=20),
              limit: int = Query(default=100, ge=1, le=1000)) -> list[dict[str, Any]]:
    with instance.context(principal) as ctx:
        steward = principal.role is Role.STEWARD
        return [service.job_view(j, steward=steward) for j in service.list_jobs(ctx, state=state, limit=limit)]


@router.get("/jobs/{job_id}", response_model=schemas.JobView, response_model_exclude_unset=True)
async def get_job(job_id: str, request: Request, instance: InstanceDep, principal: PrincipalDep,
                  wait_s: float = Query(default=0, ge=0, le=30, description="long-poll: wait this long for a change"),
                  since: str | None = Query(default=None, max_length=20, description="the state the caller last saw"),
                  ) -> dict[str, Any]:
    """A job; with `wait_s` and `since`, answers as soon as its state differs from `since`.

    The wait holds no thread: 45 long-polls once held every worker thread and /healthz took 29 s
    (review 11.14). Each look at the job borrows a thread for one read; between looks the request
    sleeps on the event loop. A token may hold `max_long_polls_per_token` waits at once.
    """
    steward = principal.role is Role.STEWARD

    def read() -> dict[str, Any]:
        with instance.read_context(principal) as ctx:
            return service.job_view(service.get_job(ctx, job_id), steward=steward)

    view = await run_in_threadpool(read)
    if since is None or view["state"] != since or wait_s <= 0:
        return view
    with long_poll_slot(request, principal, instance.settings.max_long_polls_per_token, wait_s):
        deadline = time.monotonic() + wait_s
        while (remaining := deadline - time.monotonic()) > 0:
            # A separate worker process commits elsewhere; the short slice bounds the delay then.
            await asyncio.sleep(min(remaining, LONG_POLL_SLICE_S))
            view = await run_in_threadpool(read)
            if view["state"] != since:
                break
    return view


LONG_POLL_SLICE_S = 0.25


@contextlib.contextmanager
def long_poll_slot(request: Request, principal: Principal, limit: int, wait_s: float) -> Iterator[None]:
    """Count one long-poll against the caller's token, or refuse with 429 past `limit`.

    The counts live on the app (one event loop, so no lock): per process, as the waits are.
    """
    counts: collections.Counter[str] | None = getattr(request.app.state, "long_polls", None)
    if counts is None:
        counts = collections.Counter()
        request.app.state.long_polls = counts
    key = principal.jti
    if counts[key] >= limit:
        raise TooManyRequests(f"this token already holds {counts[key]} long-polls (at most {limit}); "
                              "wait for one to answer", retry_after_s=max(1, math.ceil(wait_s)))
    counts[key] += 1
    try:
        yield
    finally:
        counts[key] -= 1
        if counts[key] <= 0:
            del counts[key]


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse,
            responses=schemas.text_answer("text/plain", "the released logs, one section per log file"))
def get_logs(job_id: str, instance: InstanceDep, principal: PrincipalDep) -> PlainTextResponse:
    """Released logs only: logs are outputs and pass the same checks."""
    with instance.context(principal) as ctx:
        job = service.get_job(ctx, job_id)
        parts = []
        for name in ("logs/stdout.txt", "logs/stderr.txt"):
            output = next((o for o in job.outputs if o.path == name), None)
            if output is None:
                continue
            if output.status != "released" or output.stored_path is None:
                shown = output.status if principal.role is Role.STEWARD else review.WITHHELD
                parts.append(f"== {name}: {shown} ==\n")
                continue
            text = (instance.settings.artifacts_dir / output.stored_path).read_text(errors="replace")
            parts.append(f"== {name} ==\n{text}")
        if not parts:
            raise NotFound(f"job {job_id} has no logs yet (state {job.state})")
        ctx.record("job.logs.read", "job", job.id)
        return PlainTextResponse("".join(parts))


@router.get("/jobs/{job_id}/outputs", response_model=list[schemas.OutputView], response_model_exclude_unset=True)
def list_outputs(job_id: str, instance: InstanceDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    with instance.context(principal) as ctx:
        job = service.get_job(ctx, job_id)
        return review.outputs_view(list(job.outputs), steward=principal.role is Role.STEWARD)


@router.get("/jobs/{job_id}/outputs/{path:path}", response_class=FileResponse,
            responses=schemas.file_answer("application/octet-stream", "the bytes of a released file"))
def download_output(job_id: str, path: str, instance: InstanceDep, principal: PrincipalDep) -> FileResponse:
    with instance.context(principal) as ctx:
        output, stored = service.released_file(ctx, job_id, path)
        return FileResponse(stored, media_type="application/octet-stream",
                            headers={"X-Content-SHA256": output.sha256})


@router.get("/jobs/{job_id}/report", response_model=schemas.ReleaseReport, response_model_exclude_unset=True)
def release_report(job_id: str, instance: InstanceDep, principal: PrincipalDep) -> dict[str, Any]:
    """What was released, what was blocked and by which rule, and what waits for review."""
    with instance.read_context(principal) as ctx:
        return service.release_report(ctx, job_id)


@router.get("/jobs/{job_id}/manifest", response_model=schemas.SignedManifest, response_model_exclude_unset=True)
def get_manifest(job_id: str, instance: InstanceDep, principal: PrincipalDep) -> dict[str, Any]:
    with instance.context(principal) as ctx:
        job = service.get_job(ctx, job_id)
        if job.manifest is None:
            raise NotFound(f"job {job_id} has no release manifest yet")
        return {"manifest": job.manifest, "signature": job.manifest_signature, "algorithm": "Ed25519"}


@router.post("/jobs/{job_id}/cancel", response_model=schemas.JobView, response_model_exclude_unset=True)
def cancel(job_id: str, request: Request, instance: InstanceDep, principal: PrincipalDep) -> dict[str, Any]:
    with instance.context(principal) as ctx:
        view = service.job_view(service.cancel_job(ctx, job_id), steward=principal.role is Role.STEWARD)
    wake_worker(request)
    return view


@router.post("/jobs/{job_id}/approve", response_model=schemas.JobView, response_model_exclude_unset=True)
def approve(job_id: str, request: Request, instance: InstanceDep, steward: Steward,
            body: Decision | None = None) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        job = service.decide_approval(ctx, job_id, approve=True, comment=body.comment if body else "")
        view = service.job_view(job, steward=True)
    wake_worker(request)
    return view


@router.post("/jobs/{job_id}/reject", response_model=schemas.JobView, response_model_exclude_unset=True)
def reject(job_id: str, instance: InstanceDep, steward: Steward, body: Decision | None = None) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        job = service.decide_approval(ctx, job_id, approve=False, comment=body.comment if body else "")
        return service.job_view(job, steward=True)


@router.get("/reviews", response_model=list[schemas.JobView], response_model_exclude_unset=True)
def reviews(instance: InstanceDep, steward: Steward) -> list[dict[str, Any]]:
    with instance.context(steward) as ctx:
        return [service.job_view(j, steward=True) for j in service.review_queue(ctx)]


@router.get("/reviews/{job_id}/files/{path:path}", response_class=FileResponse,
            responses=schemas.file_answer("application/octet-stream", "the bytes of the output, whatever its status"))
def review_file(job_id: str, path: str, instance: InstanceDep, steward: Steward) -> FileResponse:
    """A steward reads any output of a job, whatever its status, to decide on it (audited)."""
    with instance.context(steward) as ctx:
        output, stored = service.output_for_review(ctx, job_id, path)
        return FileResponse(stored, media_type="application/octet-stream",
                            headers={"X-Content-SHA256": output.sha256})


@router.post("/reviews/{job_id}/decisions", response_model=schemas.JobView, response_model_exclude_unset=True)
def decide(job_id: str, body: ReviewDecision, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        job = service.decide_outputs(ctx, job_id, release=body.release, reject=body.reject, comment=body.comment,
                                     signer=instance.signing_key)
        return service.job_view(job, steward=True)


@router.get("/usage", response_model=list[schemas.ContractUsage], response_model_exclude_unset=True)
def usage(instance: InstanceDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    with instance.context(principal) as ctx:
        return service.usage_report(ctx)


@router.get("/signing-key", response_model=schemas.SigningKey, response_model_exclude_unset=True)
def signing_key(instance: InstanceDep, _principal: PrincipalDep) -> dict[str, str]:
    """The Ed25519 public key that signs release manifests (PEM); pin it out of band for real trust."""
    return {"algorithm": "Ed25519", "public_key_pem": instance.settings.verify_key_path.read_text()}
