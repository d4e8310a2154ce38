"""The audit log, newest first; reading it is itself audited."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from sandbox.api import schemas
from sandbox.api.deps import InstanceDep, StewardOrAuditor
from sandbox.audit import read_events, verify_stored_chain

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=list[schemas.AuditEventView], response_model_exclude_unset=True)
def list_events(instance: InstanceDep, principal: StewardOrAuditor,
                limit: int = Query(default=100, ge=1, le=1000),
                before: int | None = Query(default=None, ge=1, description="only events with seq below this"),
                action: str | None = Query(default=None, max_length=64),
                actor: str | None = Query(default=None, max_length=200),
                object_id: str | None = Query(default=None, max_length=200),
                q: str | None = Query(default=None, max_length=200,
                                      description="text anywhere in actor, action, object or details"),
                seq: list[int] | None = Query(default=None, max_length=500,
                                              description="only these events (repeat the parameter)"),
                ) -> list[dict[str, Any]]:
    with instance.context(principal) as ctx:
        return read_events(ctx.session, principal, ctx.audit, limit=limit, before=before, action=action,
                           actor=actor, object_id=object_id, text=q, seqs=seq or ())


@router.get("/verify", response_model=schemas.ChainVerification, response_model_exclude_unset=True)
def verify(instance: InstanceDep, principal: StewardOrAuditor) -> dict[str, Any]:
    """The chain checked link by link and against the instance's own checkpoints, so a database cut back to
    an older signed head fails here as it does in `sandbox audit verify`."""
    with instance.context(principal) as ctx:
        report = verify_stored_chain(ctx.session, instance.public_key, instance.settings.audit_checkpoint_path)
        return {"ok": report.ok, "events": report.events, "first_bad_seq": report.first_bad_seq,
                "problem": report.problem}
