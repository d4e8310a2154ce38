"""The review end of the release pipeline: what each caller sees of outputs, stewards' decisions, the
signed manifest and the release report. Jobs, notebook sessions (and later training) share it.

The caller looks the job up and checks who may act on it; nothing here fetches a job.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from sandbox.auth.keys import canonical
from sandbox.auth.tokens import Principal
from sandbox.catalog.cards import DatasetCard
from sandbox.context import Context
from sandbox.errors import Conflict, Invalid
from sandbox.release.status import Origin, OutputStatus, next_status
from sandbox.store.models import Dataset, DatasetVersion, Job, JobOutput, OutputReview
from sandbox.store.parties import job_data_orgs

WITHHELD = "withheld"  # what a buyer sees of an output it did not get


def visible_to_buyer(output: JobOutput) -> bool:
    """Whether a buyer may see that an output exists under its name: released files, and what the platform made."""
    return output.status == OutputStatus.RELEASED.value or output.origin == Origin.PLATFORM.value


def output_view(output: JobOutput, *, steward: bool) -> dict[str, Any]:
    """One output as the caller may see it.

    Buyers never see the name, size, hash or kind of a file they did not get: each is a channel the
    job's code controls. An unreleased file of the job's own is one anonymous `withheld` entry.
    """
    if not steward and not visible_to_buyer(output):
        return {"path": None, "size": None, "sha256": None, "kind": None, "verdict": None,
                "status": WITHHELD, "origin": output.origin, "rules": []}
    released = output.status == OutputStatus.RELEASED.value
    view: dict[str, Any] = {
        "path": output.path, "size": output.size if released or steward else None,
        "sha256": output.sha256 if released or steward else None, "kind": output.kind,
        "verdict": output.verdict, "status": output.status, "origin": output.origin,
        "rules": [c["rule"] for c in output.checks if c["verdict"] != "pass"],
    }
    if output.spec is not None:
        view["spec"] = output.spec
    if steward:
        # Reasons can quote what a check found; buyers see the rule names only.
        view["checks"] = output.checks
        view["decided_by"] = output.decided_by
        view["comment"] = output.comment
    else:
        # Why the platform made no table names card columns and rules only, never a value.
        view["reasons"] = [c["reason"] for c in output.checks if c["rule"] == "table-spec"]
    return view


def outputs_view(outputs: list[JobOutput], *, steward: bool) -> list[dict[str, Any]]:
    """Outputs in path order; for buyers, withheld entries last, so their order says nothing of their names."""
    views = [output_view(o, steward=steward) for o in outputs]
    return views if steward else sorted(views, key=lambda v: v["status"] == WITHHELD)


def manifest_data(session: Session, job: Job, name: str | None = None, number: int | None = None) -> dict[str, Any]:
    """The data a job's outputs came from (its `dataset`, or the version `name`@`number` it also read): the
    exact version, the publishing org's signature over it, and the licence terms it was published under
    (as signed; the card's while a version is unsigned)."""
    name, number = (name, number) if name is not None and number is not None else (job.dataset, job.dataset_version)
    row = session.execute(
        select(Dataset, DatasetVersion).join(DatasetVersion, DatasetVersion.dataset_id == Dataset.id)
        .where(Dataset.name == name, DatasetVersion.version == number)).one_or_none()
    if row is None:
        raise Invalid(f"job {job.id} names {name}@{number}, which does not exist")
    dataset, version = row
    signed = version.signature
    if signed is not None:
        licence = signed["statement"]["licence"]
        signature: dict[str, Any] | None = {key: signed[key] for key in ("key_id", "statement_sha256", "signature")}
    else:
        licence, signature = DatasetCard.model_validate(dataset.card).licence.model_dump(mode="json"), None
    return {"dataset": dataset.name, "version": version.version, "org": dataset.owner_org, "signature": signature,
            "licence": {key: licence.get(key) for key in
                        ("name", "attribution", "derived_model_retention_days", "training_allowed")}}


def sign_manifest(job: Job, signer: Any) -> None:
    """(Re)write the job's release manifest over its released files and the data they came from, sign it
    (Ed25519), and count the released bytes for usage."""
    session = object_session(job)
    if session is None:
        raise ValueError(f"job {job.id} is not attached to a session; its data cannot be named")
    files = [{"path": o.path, "sha256": o.sha256, "size": o.size, "origin": o.origin,
              **({"spec": o.spec} if o.spec is not None else {})}
             for o in job.outputs if o.status == OutputStatus.RELEASED.value]
    manifest = {"job": job.id, "dataset": f"{job.dataset}@{job.dataset_version}", "code_sha256": job.code_sha256,
                "image_id": job.image_id, "files": files, "data": manifest_data(session, job),
                "signed_at": datetime.now(UTC).isoformat()}
    if job.datasets and len(job.datasets) > 1:
        # Data of several hospitals: each version read, with its own org's signature and licence (issue 17).
        manifest["all_data"] = [manifest_data(session, job, str(entry["name"]), int(entry["version"]))
                                for entry in job.datasets]
    job.manifest = manifest
    job.manifest_signature = signer.sign(canonical(manifest)).hex()
    job.usage = {**job.usage, "bytes_released": sum(f["size"] for f in files)}


def reviewing_orgs(session: Session, job_id: str) -> list[str]:
    """The orgs whose stewards review a job's outputs: those whose data it read (issue 17), or for an older
    job its contract's owner."""
    job = session.get(Job, job_id)
    return job_data_orgs(session, job) if job is not None else []


def approvals(ctx: Context, output: JobOutput) -> list[OutputReview]:
    """Releases that count for the file as it is now: a changed file resets its reviews, and only
    stewards of the orgs that own the data count, one vote each (the two-person rule, review 11.10)."""
    orgs = reviewing_orgs(ctx.session, output.job_id)
    reviews = ctx.session.execute(select(OutputReview).where(
        OutputReview.output_id == output.id, OutputReview.decision == "release",
        OutputReview.sha256 == output.sha256, OutputReview.org.in_(orgs)).order_by(OutputReview.id)).scalars()
    distinct: dict[str, OutputReview] = {}
    for review in reviews:
        distinct.setdefault(review.steward, review)
    return list(distinct.values())


def released_by_every_org(ctx: Context, output: JobOutput, needed: int) -> bool:
    """Whether `needed` different stewards of each org whose data the job read released the file: data of
    several hospitals leaves only with each one's release."""
    counted = approvals(ctx, output)
    return all(sum(1 for a in counted if a.org == org) >= needed for org in reviewing_orgs(ctx.session, output.job_id))


def record_decisions(ctx: Context, job: Job, *, steward: Principal, release: list[str], reject: list[str],
                     comment: str, needed: int) -> None:
    """A steward's per-file decisions. A file leaves once `needed` different stewards have released it,
    as it is now; one rejection blocks it. Each move goes through the output status table."""
    if set(release) & set(reject):
        raise Invalid("a file cannot be both released and rejected", sorted(set(release) & set(reject)))
    by_path = {o.path: o for o in job.outputs}
    unknown = [p for p in [*release, *reject] if p not in by_path]
    if unknown:
        raise Invalid("no such outputs", unknown)
    now = datetime.now(UTC)
    for path in release + reject:
        output = by_path[path]
        if output.status != OutputStatus.IN_REVIEW.value:
            raise Conflict(f"{path} is {output.status}, not in review")
        if path in release and output.verdict == "block":
            raise Conflict(f"{path} was blocked by a check and cannot be released")
        if path in release and any(a.steward == steward.sub for a in approvals(ctx, output)):
            raise Conflict(f"{steward.sub} already released {path}; it needs a different steward")
        decision = "release" if path in release else "reject"
        ctx.session.add(OutputReview(output_id=output.id, steward=steward.sub, org=steward.org, decision=decision,
                                     sha256=output.sha256, comment=comment, at=now))
        ctx.session.flush()
        released = decision == "release" and released_by_every_org(ctx, output, needed)
        if decision == "reject" or released:
            output.status = next_status(output.status,
                                        OutputStatus.RELEASED if released else OutputStatus.BLOCKED).value
            output.decided_by, output.decided_at, output.comment = steward.sub, now, comment
        ctx.record(f"job.output.{decision}", "job", job.id, path=path, sha256=output.sha256, comment=comment,
                   approvals=len(approvals(ctx, output)), needed=needed, status=output.status,
                   **({"bytes_released": output.size} if released else {}))


def release_report(ctx: Context, job: Job, *, steward: bool, needed: int, reason: str) -> dict[str, Any]:
    """Released files, blocked files with the rules that blocked them, and files waiting for review.

    Buyers see their files only once released; the rest is a count (`withheld`), as in `output_view`.
    """
    report: dict[str, Any] = {"job": job.id, "state": job.state, "reason": reason,
                              "released": [], "blocked": [], "in_review": [], "withheld": 0}
    for output in job.outputs:
        if not steward and not visible_to_buyer(output):
            report["withheld"] += 1
            continue
        view = output_view(output, steward=steward)
        entry: dict[str, Any] = {key: view[key] for key in ("path", "size", "sha256", "kind", "origin")}
        if output.status == OutputStatus.RELEASED.value:
            report["released"].append(entry)
        elif output.status == OutputStatus.BLOCKED.value:
            entry["rules"] = [c["rule"] for c in output.checks if c["verdict"] == "block"] or ["rejected-in-review"]
            entry["reasons"] = [c["reason"] for c in output.checks if c["verdict"] == "block"] if steward \
                else view["reasons"]
            report["blocked"].append(entry)
        else:
            entry["approvals"] = len(approvals(ctx, output))
            entry["needed"] = needed * max(len(reviewing_orgs(ctx.session, job.id)), 1)
            entry["rules"] = [c["rule"] for c in output.checks if c["verdict"] == "review"]
            report["in_review"].append(entry)
    return report
