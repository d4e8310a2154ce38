"""The security log: refusals of callers nobody could identify (bad or missing tokens).

They never reach the signed audit chain, where an anonymous caller could fill it with text of their
choosing (review 11.11). Here every field is bounded and escaped, and lines are rate-limited per client
address, so a flood costs one line per address per window plus a count of what was dropped.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sandbox.logs import get_logger

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from sandbox.audit import AuditLog
    from sandbox.auth.tokens import Principal

MAX_FIELD = 200
_log = get_logger("sandbox.security")


def bounded(value: object, limit: int = MAX_FIELD) -> str:
    """`value` as printable text of at most `limit` characters; a cut one ends with its original length."""
    text = str(value)
    if len(text) <= limit:
        return "".join(c if c.isprintable() else "\ufffd" for c in text)
    suffix = f"...[{len(text)} chars]"
    kept = text[:max(0, limit - len(suffix))]
    return "".join(c if c.isprintable() else "\ufffd" for c in kept) + suffix


@dataclass
class _Window:
    started: float
    lines: int = 0
    dropped: int = 0


@dataclass
class SecurityLog:
    """Rate-limited structured lines, `per_client` per `window_s` for each client address.

    `emit` receives each line's fields (the structlog logger `sandbox.security` by default); the
    newest lines are kept in `recent` for operators and tests.
    """

    per_client: int = 20
    window_s: float = 60.0
    max_clients: int = 10_000
    emit: Callable[[dict[str, str]], None] | None = None
    recent: deque[dict[str, str]] = field(default_factory=lambda: deque(maxlen=500))
    _windows: OrderedDict[str, _Window] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refusal(self, *, client: str | None, status: int, method: str, path: str, reason: str,
                clock: Callable[[], float] = time.monotonic, **extra: Any) -> bool:
        """Record one refusal of an unidentified caller; False when the client's window is full."""
        address = bounded(client or "-", 64)
        now = clock()
        with self._lock:
            window = self._windows.get(address)
            suppressed = 0
            if window is None or now - window.started >= self.window_s:
                suppressed = window.dropped if window else 0
                window = _Window(started=now)
            self._windows[address] = window
            self._windows.move_to_end(address)
            while len(self._windows) > self.max_clients:  # a spray of addresses cannot grow memory
                self._windows.popitem(last=False)
            if window.lines >= self.per_client:
                window.dropped += 1
                return False
            window.lines += 1
        line = {"event": "request.refused", "client": address, "status": str(status), "method": bounded(method, 16),
                "path": bounded(path), "reason": bounded(reason),
                **{key: bounded(value) for key, value in extra.items()}}
        if suppressed:
            line["suppressed_before"] = str(suppressed)
        self.recent.append(line)
        if self.emit is not None:
            self.emit(line)
        else:
            _log.warning(**line)
        return True


def mark_recorded(error: BaseException) -> None:
    """Note that a refusal was already recorded (security log or audit), so no later layer repeats it."""
    error.__dict__["refusal_recorded"] = True


def was_recorded(error: BaseException) -> bool:
    return bool(error.__dict__.get("refusal_recorded"))


class Audited(Protocol):
    """What `audit_refusal` needs of an `Instance`, which sits above this module: its sessions and audit log."""

    @property
    def sessions(self) -> sessionmaker[Session]: ...

    @property
    def audit(self) -> AuditLog: ...


def audit_refusal(instance: Audited, principal: Principal, *, action: str = "request.refused", status: int,
                  method: str, route: str, object_id: str, reason: str) -> None:
    """Put an identified caller's refusal (403, or 404 on what is not theirs) on the signed chain,
    with bounded fields: the caller is known, so the event is theirs to answer for."""
    try:
        with instance.sessions() as session, session.begin():
            instance.audit.record(session, actor=principal, action=action, object_type="request",
                                  object_id=bounded(object_id or "-"),
                                  details={"status": status, "method": bounded(method, 16),
                                           "route": bounded(route), "reason": bounded(reason)})
    except Exception as exc:  # the refusal stands whether or not its record could be written
        _log.error("refusal_audit_failed", error_type=type(exc).__name__, actor=principal.actor,
                   route=bounded(route))
