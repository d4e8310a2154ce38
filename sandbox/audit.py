"""The append-only, hash-chained audit log: the one function every state change goes through."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import ColumnElement, String, and_, cast, exists, func, or_, select, union
from sqlalchemy import event as orm_event
from sqlalchemy.orm import Session

from sandbox.auth.tokens import Principal, Role
from sandbox.errors import Forbidden
from sandbox.store.models import AuditEvent, AuditHead, Dataset, Job
from sandbox.store.parties import party_contracts

GENESIS_HASH = "0" * 64
log = structlog.get_logger(__name__)
# Where, in a session's `info`, the head that its transaction will commit waits for the checkpoint file.
_PENDING_HEAD = "audit_pending_head"
_HOOKED = "audit_checkpoint_hook"


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
class Checkpoint:
    """A signed (seq, hash) of the chain's head, kept outside the database.

    The database, its WAL and its backups hold many older heads, each validly signed; restoring one
    after deleting the newest events passes a check of the database alone. A checkpoint held
    elsewhere (the instance's append-only file, or an auditor's copy) says how far the chain reached.
    """

    seq: int
    hash: str
    signature: str

    def is_signed_by(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(bytes.fromhex(self.signature), _head_message(self.seq, self.hash))
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_json(self, **extra: Any) -> str:
        return json.dumps({"seq": self.seq, "hash": self.hash, "signature": self.signature, "algorithm": "Ed25519",
                           **extra}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        body = json.loads(text)
        if not (isinstance(body, dict) and isinstance(body.get("seq"), int) and isinstance(body.get("hash"), str)
                and isinstance(body.get("signature"), str)):
            raise ValueError("a checkpoint is a JSON object with seq, hash and signature")
        return cls(seq=body["seq"], hash=body["hash"], signature=body["signature"])


def instance_checkpoints(path: Path) -> tuple[list[Checkpoint], int]:
    """The instance's own checkpoints; none for an instance from before checkpoints, or whose file was removed."""
    return read_checkpoints(path) if path.exists() else ([], 0)


def read_checkpoints(path: Path) -> tuple[list[Checkpoint], int]:
    """The checkpoints in a file (one JSON object a line), and how many lines could not be read.

    A line cut short by a crash mid-append is unreadable, not a forgery, so it is counted, not fatal.
    """
    checkpoints, unreadable = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            checkpoints.append(Checkpoint.from_json(line))
        except ValueError:
            unreadable += 1
    return checkpoints, unreadable


def append_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """One line, one write(2) on an O_APPEND descriptor: processes sharing the file never interleave."""
    line = (checkpoint.to_json(at=datetime.now(UTC).isoformat(timespec="seconds")) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class SystemActor:
    """The service acting on its own (start-up, scheduler, bootstrap)."""

    sub: str = "system"
    org: str = "-"
    role: str = "system"


class AuditLog:
    """Appends events under a lock on the chain's signed head, in the caller's transaction.

    With `checkpoint_file`, every committed head is also appended there, after its commit (a head
    written before would name events that a rollback then removes).
    """

    def __init__(self, signing_key: Ed25519PrivateKey, checkpoint_file: Path | None = None) -> None:
        self._key = signing_key
        self._checkpoint_file = checkpoint_file

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
        if self._checkpoint_file is not None:
            session.info[_PENDING_HEAD] = Checkpoint(seq=seq, hash=previous, signature=head.signature)
            self._hook(session)
        return appended

    def _hook(self, session: Session) -> None:
        if session.info.get(_HOOKED):
            return
        session.info[_HOOKED] = True
        path = self._checkpoint_file
        assert path is not None

        def committed(done: Session) -> None:
            checkpoint = done.info.pop(_PENDING_HEAD, None)
            if checkpoint is None:
                return
            try:
                append_checkpoint(path, checkpoint)
            except OSError:  # the events are committed; a missing line weakens the check, it does not undo them
                log.exception("audit_checkpoint_write_failed", seq=checkpoint.seq)

        def rolled_back(done: Session) -> None:
            done.info.pop(_PENDING_HEAD, None)

        orm_event.listen(session, "after_commit", committed)
        orm_event.listen(session, "after_rollback", rolled_back)


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str | None = None


def verify_chain(session: Session, public_key: Ed25519PublicKey,
                 checkpoints: Iterable[Checkpoint] = ()) -> ChainReport:
    """Recompute every link and the signed head; name the first event that does not fit.

    Each checkpoint must be signed by `public_key` and name an event of the chain with its hash: a
    chain shorter than a checkpoint was truncated, one that disagrees with it was rewritten.
    """
    expected: dict[int, str] = {}
    for checkpoint in checkpoints:
        if not checkpoint.is_signed_by(public_key):
            return ChainReport(False, 0, checkpoint.seq,
                               f"the checkpoint for event {checkpoint.seq} is not signed by this instance's key")
        if expected.setdefault(checkpoint.seq, checkpoint.hash) != checkpoint.hash:
            return ChainReport(False, 0, checkpoint.seq,
                               f"two signed checkpoints disagree about event {checkpoint.seq}")
    furthest = max(expected, default=0)
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
        if expected.get(event.seq, event.hash) != event.hash:
            return ChainReport(
                False, count, event.seq,
                f"event {event.seq} differs from the signed checkpoint of it: the chain was rewritten from there",
            )
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
    if furthest > head.seq:
        return ChainReport(
            False, count, head.seq + 1,
            f"the chain ends at event {head.seq} but a signed checkpoint names event {furthest}: the newest "
            "events were deleted (or the database was restored from an older copy)",
        )
    return ChainReport(True, count)


def verify_stored_chain(session: Session, public_key: Ed25519PublicKey, checkpoint_path: Path) -> ChainReport:
    """The chain checked link by link and against the instance's own checkpoints (`GET /v1/audit/verify`)."""
    checkpoints, _ = instance_checkpoints(checkpoint_path)
    return verify_chain(session, public_key, checkpoints)


def steward_events(org: str) -> ColumnElement[bool]:
    """The events a steward of `org` reads: those of its own people, those about its own datasets,
    contracts and the jobs under them (whoever acted, refusals included), and the service's own
    instance, image and shipped-policy events. Another org's business stays theirs (review 11.10). A contract
    naming data of several orgs, and its jobs, are each party's business (issue 17)."""
    granted = party_contracts(org)
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


def read_events(session: Session, principal: Principal, log: AuditLog, *, limit: int, before: int | None = None,
                action: str | None = None, actor: str | None = None, object_id: str | None = None,
                text: str | None = None, seqs: Iterable[int] = ()) -> list[dict[str, Any]]:
    """The events `principal` may read (a steward its org's, `steward_events`), newest first, each filter
    exact but `text` (case-insensitive, anywhere in actor, action, object or details); the read is audited."""
    if principal.role not in (Role.STEWARD, Role.AUDITOR):
        raise Forbidden(f"role {principal.role.value!r} may not read the audit log (needs steward, auditor)")
    query = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
    if principal.role is Role.STEWARD:
        query = query.where(steward_events(principal.org))
    if before is not None:
        query = query.where(AuditEvent.seq < before)
    if action:
        query = query.where(AuditEvent.action == action)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if object_id:
        query = query.where(AuditEvent.object_id == object_id)
    wanted = sorted(set(seqs))
    if wanted:
        query = query.where(AuditEvent.seq.in_(wanted))
    if text:
        needle = text.lower()
        query = query.where(or_(*(func.lower(column).contains(needle, autoescape=True) for column in (
            AuditEvent.actor, AuditEvent.action, AuditEvent.object_type, AuditEvent.object_id,
            cast(AuditEvent.details, String)))))
    events = [{**event_fields(event), "hash": event.hash} for event in session.execute(query).scalars()]
    log.record(session, actor=principal, action="audit.read", object_type="audit", object_id="-",
               details={"count": len(events)})
    return events
