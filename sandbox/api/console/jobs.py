"""The steward's queues (jobs awaiting approval, outputs in review) and the job page both roles share.

A steward decides here exactly as through the API: `decide_approval` and `decide_outputs` with their
context, so the two-person rule, the org rules and the audit chain are the API's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from sandbox.api.console import session
from sandbox.api.console.listings import Preview, code_diff, code_listing, image_type, preview
from sandbox.api.console.pages import FILE_POLICY, render
from sandbox.api.console.session import ConsoleUser
from sandbox.api.routes.jobs import wake_worker
from sandbox.auth.tokens import Principal, Role
from sandbox.instance import Instance
from sandbox.jobs import service
from sandbox.jobs.lifecycle import JobState
from sandbox.release import review
from sandbox.release.status import OutputStatus
from sandbox.store.models import Job

router = APIRouter(prefix="/console", include_in_schema=False)

MAX_COMMENT = 5000


def _instance(request: Request) -> Instance:
    instance: Instance = request.app.state.instance
    return instance


# -- approvals -------------------------------------------------------------------------------------

@router.get("/approvals", response_class=HTMLResponse)
async def approvals(request: Request, principal: ConsoleUser) -> Response:
    session.require_role(principal, Role.STEWARD)

    def load() -> list[dict[str, Any]]:
        with _instance(request).read_context(principal) as ctx:
            pending = service.list_jobs(ctx, state=JobState.PENDING_APPROVAL.value, limit=1000)
            return [service.job_view(j, steward=True) for j in pending if j.buyer_org != principal.org]

    return render(request, "approvals.html", principal=principal, jobs=await run_in_threadpool(load))


@dataclass
class JobPage:
    job: dict[str, Any]
    steward: bool
    listing: Any
    previous: str | None
    diff: list[Any]
    report: dict[str, Any]
    training: str | None


def _job_page(instance: Instance, principal: Principal, job_id: str) -> JobPage:
    steward = principal.role is Role.STEWARD
    with instance.read_context(principal) as ctx:
        job = service.get_job(ctx, job_id)
        code = service.jobs_dir(ctx, job.id) / "code"
        listing = code_listing(code)
        previous = service.last_approved_job(ctx, job) if steward else None
        diff = code_diff(code_listing(service.jobs_dir(ctx, previous.id) / "code"), listing) if previous else []
        view = service.job_view(job, steward=steward)
        report = service.release_report(ctx, job.id)
        training = json.dumps(view["training"], indent=2, sort_keys=True) if view.get("training") else None
        return JobPage(job=view, steward=steward, listing=listing, previous=previous.id if previous else None,
                       diff=diff, report=report, training=training)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str, principal: ConsoleUser) -> Response:
    session.require_role(principal, Role.STEWARD, Role.BUYER)
    page = await run_in_threadpool(_job_page, _instance(request), principal, job_id)
    may_decide = (page.steward and page.job["state"] == JobState.PENDING_APPROVAL.value
                  and page.job["buyer_org"] != principal.org)
    in_review = page.steward and bool(page.report["in_review"])
    return render(request, "job.html", principal=principal, page=page, may_decide=may_decide, in_review=in_review,
                  quote=quote)


@router.post("/jobs/{job_id}/decision")
def decide_job(request: Request, job_id: str, principal: ConsoleUser,
               decision: Annotated[Literal["approve", "reject"], Form()],
               csrf: Annotated[str, Form(max_length=200)] = "",
               comment: Annotated[str, Form(max_length=MAX_COMMENT)] = "") -> Response:
    session.check_csrf(request, principal, csrf)
    with _instance(request).context(principal) as ctx:
        job = service.decide_approval(ctx, job_id, approve=decision == "approve", comment=comment)
        still_pending = job.state == "pending_approval"
    if decision == "approve":
        wake_worker(request)
    # A job reading several hospitals' data waits for each one's approval: say so rather than "queued".
    notice = ("approved-waiting" if still_pending else "approved") if decision == "approve" else "rejected"
    return RedirectResponse(f"/console/jobs/{quote(job_id)}?notice={notice}", status_code=303)


@router.get("/jobs/{job_id}/outputs/{path:path}")
def download_released(request: Request, job_id: str, path: str, principal: ConsoleUser) -> Response:
    """A released file, as an attachment: the browser saves it and never renders it here."""
    with _instance(request).context(principal) as ctx:
        output, stored = service.released_file(ctx, job_id, path)
    return FileResponse(stored, media_type="application/octet-stream", filename=Path(output.path).name,
                        headers={"X-Content-SHA256": output.sha256, "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": FILE_POLICY})


# -- reviews ---------------------------------------------------------------------------------------

@router.get("/reviews", response_class=HTMLResponse)
async def reviews(request: Request, principal: ConsoleUser) -> Response:
    session.require_role(principal, Role.STEWARD)

    def load() -> list[dict[str, Any]]:
        with _instance(request).read_context(principal) as ctx:
            queue = []
            for job in service.review_queue(ctx):
                view = service.job_view(job, steward=True)
                view["waiting"] = sum(o.status == OutputStatus.IN_REVIEW.value for o in job.outputs)
                queue.append(view)
            return queue

    return render(request, "reviews.html", principal=principal, jobs=await run_in_threadpool(load))


@dataclass
class ReviewFile:
    output: dict[str, Any]
    preview: Preview
    approvals: list[str]
    needed: int
    released_by_me: bool

    @property
    def waiting(self) -> bool:
        return bool(self.output["status"] == OutputStatus.IN_REVIEW.value)


def _review_page(instance: Instance, principal: Principal, job_id: str) -> tuple[dict[str, Any], list[ReviewFile],
                                                                                 str | None]:
    # A write context: reading a file to decide on it is audited (`job.output.inspect`), as through the API.
    with instance.context(principal) as ctx:
        job: Job = service.job_to_decide(ctx, job_id)[1]
        needed = service.reviewers_needed(ctx, job)
        files = []
        for output in sorted(job.outputs, key=lambda o: o.path):
            stored = service.output_for_review(ctx, job.id, output.path)[1] if output.stored_path else None
            names = [a.steward for a in review.approvals(ctx, output)]
            files.append(ReviewFile(output=review.output_view(output, steward=True),
                                    preview=preview(output.path, stored), approvals=names, needed=needed,
                                    released_by_me=principal.sub in names))
        view = service.job_view(job, steward=True)
        gate = (job.training or {}).get("gate")
        return view, files, json.dumps(gate, indent=2, sort_keys=True) if gate else None


@router.get("/reviews/{job_id}", response_class=HTMLResponse)
async def review_page(request: Request, job_id: str, principal: ConsoleUser) -> Response:
    session.require_role(principal, Role.STEWARD)
    job, files, gate = await run_in_threadpool(_review_page, _instance(request), principal, job_id)
    return render(request, "review.html", principal=principal, job=job, files=files, gate=gate, quote=quote)


@router.post("/reviews/{job_id}/decision")
def decide_file(request: Request, job_id: str, principal: ConsoleUser,
                path: Annotated[str, Form(max_length=500)],
                decision: Annotated[Literal["release", "reject"], Form()],
                csrf: Annotated[str, Form(max_length=200)] = "",
                comment: Annotated[str, Form(max_length=MAX_COMMENT)] = "") -> Response:
    """One file's decision, with the steward's comment; the API's two-person rule decides when it leaves."""
    session.check_csrf(request, principal, csrf)
    instance = _instance(request)
    with instance.context(principal) as ctx:
        service.decide_outputs(ctx, job_id, release=[path] if decision == "release" else [],
                               reject=[path] if decision == "reject" else [], comment=comment,
                               signer=instance.signing_key)
    return RedirectResponse(f"/console/reviews/{quote(job_id)}?notice=decided", status_code=303)


@router.get("/reviews/{job_id}/files/{path:path}")
def review_file(request: Request, job_id: str, path: str, principal: ConsoleUser,
                render_as: Annotated[Literal["text", "image", "html"], "how to show it"] = "text") -> Response:
    """An output's bytes for the review page's preview, under a policy that runs and loads nothing.

    Raster images go out as their sniffed type, SVG as an image (so `<img>` shows it and no script in it
    runs), HTML only into the page's sandboxed frame, everything else as plain text.
    """
    session.require_role(principal, Role.STEWARD)
    with _instance(request).context(principal) as ctx:
        output, stored = service.output_for_review(ctx, job_id, path)
    with stored.open("rb") as handle:
        head = handle.read(16)
    media_type = "text/plain; charset=utf-8"
    if render_as == "image":
        media_type = image_type(head) or ("image/svg+xml" if path.lower().endswith(".svg") else media_type)
    elif render_as == "html":
        media_type = "text/html; charset=utf-8"
    return FileResponse(stored, media_type=media_type, content_disposition_type="inline",
                        filename=Path(output.path).name,
                        headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": FILE_POLICY,
                                 "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                                 "Cross-Origin-Resource-Policy": "same-origin"})
