"""The append-only, hash-chained audit log: the one function every state change goes through."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox.auth.tokens import Principal
from sandbox.store.models import AuditEvent, AuditHead

GENESIS_HASH = "0" * 64


def event_hash(fields: dict[str, Any]) -> str:
    """sha256 over a canonical JSON form of the event's fields (which include `prev_hash`)."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def event_fields(event: AuditEvent) -> dict[str, Any]:
    """Everything the hash covers, in the form it is hashed (and shown)."""
    return {
        "seq": event.seq,
        "at": event.at.astimezone(UTC).isoformat(),
        "actor": event.actor,
        "org": event.org,
        "role": event.role,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "details": event.details,
        "prev_hash": event.prev_hash,
    }


def _head_message(seq: int, hash_: str) -> bytes:
    return f"audit-head:{seq}:{hash_}".encode()


@dataclass(frozen=True)
class SystemActor:
    """The service acting on its own (start-up, scheduler, bootstrap)."""

    sub: str = "system"
    org: str = "-"
    role: str = "system"


class AuditLog:
    """Appends events under a lock on the chain's signed head, in the caller's transaction."""

    def __init__(self, signing_key: Ed25519PrivateKey) -> None:
        self._key = signing_key

    def ensure_head(self, session: Session) -> None:
        if session.get(AuditHead, 1) is None:
            signature = self._key.sign(_head_message(0, GENESIS_HASH)).hex()
            session.add(AuditHead(id=1, seq=0, hash=GENESIS_HASH, signature=signature))
            session.flush()

    def record(
        self,
        session: Session,
        *,
        actor: Principal | SystemActor,
        action: str,
        object_type: str,
        object_id: str,
        details: dict[str, Any] | None = None,
    ) -> AuditEvent:
        return self.record_many(session, actor=actor, events=[(action, object_type, object_id, details)])[0]

    def record_many(
        self,
        session: Session,
        *,
        actor: Principal | SystemActor,
        events: list[tuple[str, str, str, dict[str, Any] | None]],
    ) -> list[AuditEvent]:
        """Append (action, object_type, object_id, details) events in order: one lock on the head, one
        signature over the new head, however many events (a notebook's outputs come in batches)."""
        # FOR UPDATE on PostgreSQL; on SQLite the transaction already holds the write lock.
        head = session.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one()
        appended = []
        seq, previous = head.seq, head.hash
        for action, object_type, object_id, details in events:
            # The JSON round trip makes the stored details exactly what the hash covered.
            clean_details = json.loads(json.dumps(details or {}, default=str))
            seq += 1
            event = AuditEvent(
                seq=seq,
                at=datetime.now(UTC),
                actor=actor.sub,
                org=actor.org,
                role=str(actor.role),
                action=action,
                object_type=object_type,
                object_id=str(object_id),
                details=clean_details,
                prev_hash=previous,
                hash="",
            )
            event.hash = previous = event_hash(event_fields(event))
            appended.append(event)
        if not appended:
            return appended
        session.add_all(appended)
        head.seq, head.hash = seq, previous
        head.signature = self._key.sign(_head_message(seq, previous)).hex()
        session.flush()
        return appended


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str | None = None


def verify_chain(session: Session, public_key: Ed25519PublicKey) -> ChainReport:
    """Recompute every link and the signed head; name the first event that does not fit."""
    expected_seq = 1
    previous_hash = GENESIS_HASH
    count = 0
    for event in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars():
        count += 1
        if event.seq != expected_seq:
            return ChainReport(
                False, count, expected_seq,
                f"event {expected_seq} is missing (the next stored event is {event.seq}): deleted or reordered",
            )
        if event.prev_hash != previous_hash:
            return ChainReport(
                False, count, event.seq,
                f"event {event.seq} does not link to event {event.seq - 1}: deleted or reordered",
            )
        if event_hash(event_fields(event)) != event.hash:
            return ChainReport(False, count, event.seq, f"event {event.seq} was changed after it was written")
        previous_hash = event.hash
        expected_seq += 1
    head = session.get(AuditHead, 1)
    if head is None:
        return ChainReport(False, count, None, "the signed head of the chain is missing")
    try:
        public_key.verify(bytes.fromhex(head.signature), _head_message(head.seq, head.hash))
    except (InvalidSignature, ValueError):
        return ChainReport(False, count, head.seq, "the signed head of the chain was altered")
    if head.seq != expected_seq - 1 or head.hash != previous_hash:
        return ChainReport(
            False, count, expected_seq,
            f"the chain ends at event {expected_seq - 1} but the signed head names event {head.seq}: "
            "the newest events were deleted",
        )
    return ChainReport(True, count)
