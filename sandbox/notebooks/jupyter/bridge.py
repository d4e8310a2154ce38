"""The websocket bridge between clients and kernels, with the session's egress filter on every message.

jupyter_server relays ZeroMQ messages from the kernel to the client's websocket in
`handle_outgoing_message`; this subclass decodes each one (checking its signature), asks the filter
what may leave, audits it, and relays the original, a replacement, or nothing. Messages from the client
are refused by type before they reach the kernel (comms unless allowed, the debugger...).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from concurrent.futures import Future
from typing import Any

from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
)
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from tornado.ioloop import IOLoop
from traitlets import Instance

from sandbox.notebooks.jupyter.egress import Outcome
from sandbox.notebooks.jupyter.runtime import Runtime

V1 = "v1.kernel.websocket.jupyter.org"


class FilteredKernelConnection(ZMQChannelsWebsocketConnection):
    runtime = Instance(Runtime, help="the session's collaborators (`server.server_config` sets it)").tag(config=True)

    # Messages wait here, in order, behind one whose outcome needs platform work (a table recomputed) or
    # whose audit event has not committed yet: the client sees the table where the kernel displayed it,
    # before the cell's idle status, and sees no output before its record is in the log.
    _backlog: deque[tuple[Any, list[Any], Outcome, Future[None] | None]] | None = None

    def _audit(self, outcome: Outcome) -> Future[None] | None:
        """Queue the outcome's audit event; the future completes when it has committed (None: nothing to record)."""
        if outcome.audit is None:
            return None
        details = dict(outcome.audit)
        details["decision"] = details.pop("action", outcome.action)
        return self.runtime.record_before_release("notebook.output", **details)

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        rt: Runtime = self.runtime
        channel = stream if isinstance(stream, str) else getattr(stream, "channel", None)
        try:
            _, fed = self.session.feed_identities(outgoing_msg)
            msg = self.session.deserialize(fed, content=True)
            # Checked once here; the stock relay below decodes the message again, which is no replay.
            self.session.digest_history.discard(fed[0])
        except Exception:  # unsigned, forged or malformed: a kernel that does this is not trusted with a byte
            rt.record("notebook.message.refused", channel=channel, reason="malformed or badly signed")
            return
        outcome = rt.message_filter.outgoing(str(channel), msg)
        # Queued now, not when the message reaches the head of the backlog, so that a burst of outputs
        # is written in one commit.
        committed = self._audit(outcome) if outcome.work is None else None
        if self._backlog or outcome.work is not None or committed is not None:
            if self._backlog is None:
                self._backlog = deque()
            self._backlog.append((stream, outgoing_msg, outcome, committed))
            if len(self._backlog) == 1:
                IOLoop.current().spawn_callback(self._drain)
            return
        self._relay(stream, outgoing_msg, outcome)

    async def _drain(self) -> None:
        assert self._backlog is not None
        while self._backlog:
            stream, outgoing_msg, outcome, committed = self._backlog[0]
            if outcome.work is not None:
                outcome = await IOLoop.current().run_in_executor(None, outcome.work)
                committed = self._audit(outcome)
            if committed is not None:
                try:
                    await asyncio.wrap_future(committed)
                except Exception:  # audit before release: what could not be recorded does not leave
                    self._backlog.popleft()
                    self.log.error("an output was withheld because its audit event could not be written")
                    continue
            self._backlog.popleft()
            try:
                self._relay(stream, outgoing_msg, outcome)
            except Exception:  # a closed socket: the rest of the backlog has nowhere to go either
                self.log.warning("a filtered message could not be relayed", exc_info=True)

    def _relay(self, stream: Any, outgoing_msg: list[Any], outcome: Outcome) -> None:
        """Send what the filter decided; its audit event, if any, has committed already."""
        if outcome.held:
            rt: Runtime = self.runtime
            cell = outcome.audit.get("cell") if outcome.audit else None
            IOLoop.current().run_in_executor(None, lambda: rt.hold(list(outcome.held), cell=cell))
        if outcome.action == "drop":
            return
        if outcome.action == "replace":
            assert outcome.message is not None
            outgoing_msg = self.session.serialize(outcome.message)
        super().handle_outgoing_message(stream, outgoing_msg)

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        try:
            channel, header, content = self._request_of(incoming_msg)
        except Exception:
            self.log.warning("refused a malformed message from the client")
            return
        msg_type = str(header.get("msg_type", ""))
        rt: Runtime = self.runtime
        refusal = rt.message_filter.incoming(channel, msg_type)
        if refusal is not None:
            rt.record("notebook.message.refused", channel=channel, msg_type=msg_type, reason=refusal)
            self.write_stderr(f"[sandbox] {msg_type} refused: {refusal}", header)
            return
        rt.message_filter.remember(str(self.kernel_id), header, content)
        super().handle_incoming_message(incoming_msg)

    def _request_of(self, incoming_msg: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(channel, header, content) of a client message, in either websocket protocol."""
        if self.subprotocol == V1:
            channel, msg_list = deserialize_msg_from_ws_v1(incoming_msg)
            content = self.session.unpack(msg_list[3]) if len(msg_list) > 3 else {}
            return str(channel or "shell"), dict(self.session.unpack(msg_list[0])), dict(content or {})
        msg = deserialize_binary_message(incoming_msg) if isinstance(incoming_msg, bytes) else json.loads(incoming_msg)
        return str(msg.get("channel") or "shell"), dict(msg["header"]), dict(msg.get("content") or {})
