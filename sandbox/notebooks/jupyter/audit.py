"""The session's audit writer: events from the message path, written in order by one background thread.

Group commit: each batch is whatever queued while the previous one committed, never a wait for more. An
output is relayed only once its event has committed (`record_before_release`), so a server killed after
relaying cannot lose the record; a burst of outputs shares one commit instead of paying one each.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any

import structlog

from sandbox.auth.tokens import Principal
from sandbox.instance import Instance

log = structlog.get_logger(__name__)

AUDIT_BATCH_MAX = 500
_FLUSH = "__flush__"

_Event = tuple[str, dict[str, Any], Future[None] | None]


class SessionAudit:
    """Audit events about one notebook session (object `job:<id>`), recorded as `principal`."""

    def __init__(self, instance: Instance, *, job_id: str, principal: Principal) -> None:
        self.instance = instance
        self.job_id = job_id
        self.principal = principal
        self._events: queue.Queue[_Event | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_events, name="notebook-audit", daemon=True)
        self._writer.start()

    def record(self, action: str, **details: Any) -> None:
        """Queue an audit event about this session; written in order by the background writer."""
        self._events.put((action, details, None))

    def record_before_release(self, action: str, **details: Any) -> Future[None]:
        """Queue an audit event; the future completes once it has committed (or fails if it could not be).

        Audit before release: the caller relays what the event records only after this completes.
        """
        committed: Future[None] = Future()
        self._events.put((action, details, committed))
        return committed

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every event queued so far has been written (or `timeout_s` passes)."""
        done: Future[None] = Future()
        self._events.put((_FLUSH, {}, done))
        try:
            done.result(timeout_s)
        except Exception:  # a failed write is logged by the writer; a flush only waits
            return

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        self._events.put(None)
        self._writer.join(timeout=timeout_s)

    def _write_events(self) -> None:
        # An idle session's event commits at once; a busy kernel's outputs share commits.
        while True:
            first = self._events.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < AUDIT_BATCH_MAX:
                try:
                    item = self._events.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            events = [(action, details) for action, details, _ in batch if action != _FLUSH]
            failure: Exception | None = None
            try:
                if events:
                    with self.instance.context(self.principal) as ctx:
                        ctx.audit.record_many(ctx.session, actor=ctx.actor, events=[
                            (action, "job", self.job_id, details) for action, details in events])
            except Exception as exc:  # logged; outputs waiting on these events are then withheld, not relayed
                log.exception("notebook_audit_write_failed", events=len(events))
                failure = exc
            for _, _, waiting in batch:
                if waiting is None:
                    continue
                if failure is None:
                    waiting.set_result(None)
                else:
                    waiting.set_exception(failure)
            if stop:
                return
