"""Exports: a workspace file leaves a notebook session only as an output a steward reviews.

Runs in the worker, beside the data: the workspace is the worker's mount, and the checks read the
dataset's fingerprints. The API checks the buyer's access and forwards the request here
(`POST /notebooks/export` on the worker's local service), with the principal it verified.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from sandbox.catalog.service import get_dataset, get_version
from sandbox.context import Context
from sandbox.egress import CheckResult, OutputFacts, Verdict, detect_kind
from sandbox.egress.content import ContentContext, content_checks, ensure_fingerprints
from sandbox.errors import Conflict, Invalid, NotFound
from sandbox.instance import Instance
from sandbox.notebooks.servers import workspace_dir
from sandbox.notebooks.sessions import EXPORT_ROUTE, exportable_session
from sandbox.policies import get_policy_version
from sandbox.release.review import output_view
from sandbox.release.routing import route_outputs
from sandbox.release.status import Origin, OutputStatus
from sandbox.store.models import JobOutput
from sandbox.worker_socket import principal_of, worker_route

HEAD_BYTES = 8192


@worker_route(EXPORT_ROUTE)
def export_route(instance: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """`{principal, session, path}` -> `{output}`: the export's output, as the buyer sees it (wrapped, since the
    local service's envelope has a `status` of its own)."""
    buyer = principal_of(body)
    session, path = body.get("session"), body.get("path")
    if not isinstance(session, str) or not isinstance(path, str):
        raise Invalid("an export names a session and a path")
    with instance.context(buyer) as ctx:
        output = export_file(ctx, session, path, workspace=workspace_dir(instance.settings, session))
        return {"output": output_view(output, steward=False)}


def export_file(ctx: Context, identifier: str, path: str, *, workspace: Path) -> JobOutput:
    """Copy a workspace file into the session's outputs, checked, to wait for a steward's review."""
    job = exportable_session(ctx, identifier, for_update=True)
    relative = PurePosixPath(path.strip("/"))
    if not relative.parts or any(part in ("..", ".") or part.startswith(".") for part in relative.parts):
        raise Invalid(f"{path!r} is not a file of the workspace")
    source = workspace.joinpath(*relative.parts)
    current = workspace
    for part in relative.parts:  # no link anywhere on the way: the kernel writes this folder
        current = current / part
        if current.is_symlink():
            raise Invalid(f"{path!r} is a link; only regular files can be exported")
    if not source.is_file():
        raise NotFound(f"the workspace has no file {path!r}")
    policy_name, _, policy_version = job.policy.partition("@")
    policy = get_policy_version(ctx.session, policy_name, int(policy_version)).body
    limit = int(float(policy["egress"]["max_file_mb"]) * 1024 * 1024)
    size = source.stat().st_size
    if size > limit:
        raise Invalid(f"{path} is {size} bytes; the policy exports files up to {limit} bytes")
    export_path = f"exports/{relative.as_posix()}"
    if any(o.path == export_path and o.status == OutputStatus.IN_REVIEW.value for o in job.outputs):
        raise Conflict(f"{path} is already waiting for review")
    destination = ctx.settings.artifacts_dir / "jobs" / job.id / "outputs" / "exports" / relative.as_posix()
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    data = destination.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    facts = OutputFacts(path=export_path, size=len(data), head=data[:HEAD_BYTES])
    kind, _ = detect_kind(facts)
    version = get_version(ctx.session, job.dataset, job.dataset_version)
    card = get_dataset(ctx.session, job.dataset).card
    parquet = ctx.settings.artifacts_dir / version.path
    index = ensure_fingerprints(ctx.settings.artifacts_dir, job.dataset, job.dataset_version, parquet, card)
    content = content_checks(facts, kind, data, ContentContext(index=index, dataset_parquet=parquet, card=card,
                                                               policy=policy))
    # Files leave a notebook only after review, in every tier: the release routing decides block or review.
    export_review = CheckResult("notebook-export", Verdict.REVIEW, "files leave a notebook only after review")
    [decision] = route_outputs([facts], policy=policy, tier=job.tier,
                               content={export_path: [*(content or []), export_review]})
    output = next((o for o in job.outputs if o.path == export_path), None)
    if output is None:
        output = JobOutput(job_id=job.id, path=export_path)
        ctx.session.add(output)
    output.size, output.sha256, output.kind = len(data), digest, decision.kind.value
    output.verdict, output.status = decision.verdict.value, decision.status.value
    output.checks = [c.as_dict() for c in decision.checks]
    output.origin = Origin.BUYER.value
    output.stored_path = str(destination.relative_to(ctx.settings.artifacts_dir))
    output.decided_by = output.decided_at = None
    ctx.session.flush()
    ctx.record("notebook.export", "job", job.id, path=export_path, sha256=digest, size=len(data),
               status=output.status, rules=[c.rule for c in decision.checks if c.verdict is not Verdict.PASS])
    return output
