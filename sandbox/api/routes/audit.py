"""The audit log, newest first; reading it is itself audited."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from sqlalchemy import select

from sandbox.api.deps import InstanceDep, StewardOrAuditor
from sandbox.audit import event_fields, verify_chain
from sandbox.store.models import AuditEvent

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("")
def list_events(instance: InstanceDep, principal: StewardOrAuditor,
                limit: int = Query(default=100, ge=1, le=1000),
                before: int | None = Query(default=None, ge=1, description="only events with seq below this"),
                action: str | None = Query(default=None, max_length=64)) -> list[dict[str, Any]]:
    with instance.context(principal) as ctx:
        query = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
        if before is not None:
            query = query.where(AuditEvent.seq < before)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        events = [_event_view(e) for e in ctx.session.execute(query).scalars()]
        ctx.record("audit.read", "audit", "-", count=len(events))
        return events


@router.get("/verify")
def verify(instance: InstanceDep, principal: StewardOrAuditor) -> dict[str, Any]:
    with instance.context(principal) as ctx:
        report = verify_chain(ctx.session, instance.public_key)
        return {"ok": report.ok, "events": report.events, "first_bad_seq": report.first_bad_seq,
                "problem": report.problem}


def _event_view(event: AuditEvent) -> dict[str, Any]:
    return {**event_fields(event), "hash": event.hash}
