"""The audit log, newest first; reading it is itself audited."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from sqlalchemy import ColumnElement, and_, exists, func, or_, select, union

from sandbox.api import schemas
from sandbox.api.deps import InstanceDep, StewardOrAuditor
from sandbox.audit import event_fields, instance_checkpoints, verify_chain
from sandbox.auth.tokens import Role
from sandbox.store.models import AuditEvent, Contract, Dataset, Job

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=list[schemas.AuditEventView], response_model_exclude_unset=True)
def list_events(instance: InstanceDep, principal: StewardOrAuditor,
                limit: int = Query(default=100, ge=1, le=1000),
                before: int | None = Query(default=None, ge=1, description="only events with seq below this"),
                action: str | None = Query(default=None, max_length=64)) -> list[dict[str, Any]]:
    with instance.context(principal) as ctx:
        query = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
        if principal.role is Role.STEWARD:
            query = query.where(steward_events(principal.org))
        if before is not None:
            query = query.where(AuditEvent.seq < before)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        events = [_event_view(e) for e in ctx.session.execute(query).scalars()]
        ctx.record("audit.read", "audit", "-", count=len(events))
        return events


@router.get("/verify", response_model=schemas.ChainVerification, response_model_exclude_unset=True)
def verify(instance: InstanceDep, principal: StewardOrAuditor) -> dict[str, Any]:
    """The chain checked link by link and against the instance's own checkpoints, so a database cut back to
    an older signed head fails here as it does in `sandbox audit verify`."""
    checkpoints, _ = instance_checkpoints(instance.settings.audit_checkpoint_path)
    with instance.context(principal) as ctx:
        report = verify_chain(ctx.session, instance.public_key, checkpoints)
        return {"ok": report.ok, "events": report.events, "first_bad_seq": report.first_bad_seq,
                "problem": report.problem}


def steward_events(org: str) -> ColumnElement[bool]:
    """The events a steward of `org` reads: those of its own people, those about its own datasets,
    contracts and the jobs under them (whoever acted, refusals included), and the service's own
    instance, image and shipped-policy events. Another org's business stays theirs (review 11.10)."""
    granted = select(Contract.id).where(Contract.owner_org == org)
    own_objects = union(select(Dataset.name).where(Dataset.owner_org == org), granted,
                        select(Job.id).where(Job.contract_id.in_(granted)))
    # A prefix compare, not LIKE: '_' is a wildcard there and may appear in dataset names.
    prefix = func.substr(AuditEvent.object_id, 1, func.length(Dataset.name) + 1)
    own_version = exists(select(Dataset.id).where(Dataset.owner_org == org, prefix == Dataset.name + "@"))
    return or_(
        AuditEvent.org == org,
        and_(AuditEvent.object_type.in_(["dataset", "contract", "job", "request"]),
             AuditEvent.object_id.in_(own_objects)),
        # Versions, and what is done to one (a DP query names the dataset at its version: "name@3").
        and_(AuditEvent.object_type.in_(["dataset_version", "dataset"]), own_version),
        and_(AuditEvent.org == "-", AuditEvent.object_type.in_(["instance", "image", "policy"])),
    )


def _event_view(event: AuditEvent) -> dict[str, Any]:
    return {**event_fields(event), "hash": event.hash}
