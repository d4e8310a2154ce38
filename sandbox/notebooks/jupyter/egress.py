"""Notebook egress: what each message leaving a kernel may carry to the buyer's browser.

The kernel runs the buyer's code beside the data, so every field of every message it sends is hostile:
content, header, parent header, metadata, buffers, execution counts, display ids. The websocket bridge
decodes each message and asks `MessageFilter.outgoing`, which answers pass, replace (the platform's own
message instead), drop, or defer (platform work, such as recomputing a table, that runs off the event
loop and then answers one of the three). Requests from the browser meet `MessageFilter.incoming` first,
and the filter remembers what the client asked (its code, its message ids), because in the aggregate tier
that is all the platform may echo back.

What an output meets depends on the session's tier:

- **dp_only**: code sees a synthetic mock; real data only through DP answers. Outputs pass, each audited.
- **trusted**: a vetted buyer on real rows. Outputs pass, each audited; only here may the debugger run.
- **aggregate**: code sees real rows, and nothing the kernel wrote reaches the browser. What leaves is
  what the platform knows exactly: a table the platform recomputed from the dataset and checked (the
  kernel sends only its specification, `TABLE_SPEC_MIME`), a DP answer the platform recorded when it
  answered (the kernel sends only the answer's id, `DP_ANSWER_MIME`), an error's exception type (from a
  fixed list) with the buyer's own line (from the code the client sent), and protocol messages rebuilt by
  the platform. Everything else is withheld with a notice; figures go to the steward's queue, and any
  other output can be written to the workspace and exported for review. A scanner that looks for rows
  in what the kernel wrote loses to any re-encoding of the rows, which is why it no longer decides.

Every tier: the size limit and the comms rule apply, and the debugger is for trusted sessions only.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import hmac
import html
import itertools
import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

TIERS = ("dp_only", "aggregate", "trusted")
DEFAULT_MAX_OUTPUT_KB = 256

TABLE_SPEC_MIME = "application/vnd.sandbox.table-spec+json"
DP_ANSWER_MIME = "application/vnd.sandbox.dp-answer+json"

# Rule names, as the audit log and the notices show them.
RULE_SIZE = "notebook-output-size"
RULE_COMMS = "notebook-comms"
RULE_DEBUG = "notebook-debug"
RULE_FIGURE = "notebook-figure"
RULE_MALFORMED = "notebook-malformed"
RULE_UNVERIFIED = "notebook-unverified"
RULE_STATE = "notebook-state"
RULE_TABLE_SPEC = "table-spec"
RULE_DP_ANSWER = "dp-answer"

# What each rule guards against, in words that quote no data: the notices name rules with these.
RULE_SUMMARIES = {
    RULE_SIZE: "larger than the policy's notebook output limit",
    RULE_COMMS: "comms are off for this session",
    RULE_DEBUG: "the debugger is off for this session",
    RULE_FIGURE: "figures are released by a steward",
    RULE_MALFORMED: "a malformed message",
    RULE_UNVERIFIED: "an aggregate notebook shows only tables the platform recomputed "
                     "(sandbox_client.tables.crosstab) and DP answers (sandbox_client.dp.query); write anything "
                     "else to a file under /output and export it for review",
    RULE_STATE: "a kernel state the platform does not know",
    RULE_TABLE_SPEC: "a table specification the platform cannot compute",
    RULE_DP_ANSWER: "a DP answer the platform did not record",
    "min-cell-count": "a cell counts fewer records than the policy's minimum",
    "zeros": "zero cells",
    "dominance": "cells dominated by a few contributors",
    "p-ratio": "cells that let one contributor estimate another",
    "differencing": "cells that, with tables already released, single out a few records",
}

CLIENT_REQUESTS = frozenset({
    "execute_request", "inspect_request", "complete_request", "history_request", "is_complete_request",
    "kernel_info_request", "comm_info_request", "shutdown_request", "interrupt_request", "input_reply",
})
COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})
DEBUG_TYPES = frozenset({"debug_event", "debug_reply"})
# Replies and notices that carry no output; audited only when a rule fires on them.
STRUCTURAL_TYPES = frozenset({"status", "kernel_info_reply", "is_complete_reply", "comm_info_reply",
                              "shutdown_reply", "interrupt_reply", "clear_output"})
BUNDLE_TYPES = frozenset({"display_data", "execute_result", "update_display_data"})
KNOWN_KERNEL_TYPES = frozenset({
    *STRUCTURAL_TYPES, *COMM_TYPES, *DEBUG_TYPES, *BUNDLE_TYPES, "stream", "error", "execute_input",
    "execute_reply", "inspect_reply", "complete_reply", "history_reply", "input_request",
})
# The states the platform relays in the aggregate tier; a kernel's other words for its state are not relayed.
RELAYED_STATES = frozenset({"starting", "busy", "idle"})
REPLY_STATUSES = frozenset({"ok", "error", "aborted"})
COMPLETENESS = frozenset({"complete", "incomplete", "invalid", "unknown"})
FIGURE_MIMES = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg", "application/pdf": "pdf"}
BASE64_MIMES = frozenset({"image/png", "image/jpeg", "application/pdf"})
# Exception types shown by name: Python's own. Any other name is the kernel's choice (a class can be named
# after a patient), so it shows as "Exception".
SHOWN_EXCEPTIONS = frozenset(name for name, value in vars(builtins).items()
                             if isinstance(value, type) and issubclass(value, BaseException))
# What an aggregate kernel is said to be: a constant, not its kernel_info (banner, versions, links).
KERNEL_INFO = {
    "status": "ok", "protocol_version": "5.3", "implementation": "ipython", "implementation_version": "",
    "language_info": {"name": "python", "version": "3", "mimetype": "text/x-python", "file_extension": ".py",
                      "codemirror_mode": {"name": "ipython", "version": 3}, "pygments_lexer": "ipython3",
                      "nbconvert_exporter": "python"},
    "banner": "Python 3 (sandbox, aggregate tier)", "help_links": [],
}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# IPython 8 ("Cell In[3], line 2") and 7 ("<ipython-input-3-...> in <module>\n----> 2 x") name the cell's line.
_CELL_LINE = re.compile(r"Cell In\s*\[\s*\d{0,9}\s*\],\s*line (\d{1,9})"
                        r"|<ipython-input-[^>]{0,80}>[^\n]*\n-*>\s*(\d{1,9})")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9-]")
MAX_REMEMBERED_REQUESTS = 2000
MAX_SHOWN_LINE = 200  # characters of the buyer's line shown under an error


@dataclass(frozen=True)
class NotebookRules:
    """What the session's policy and tier say about notebook outputs."""

    tier: str  # "dp_only" | "aggregate" | "trusted"
    allow_comms: bool
    max_output_bytes: int
    sdc: dict[str, Any]

    @classmethod
    def from_policy(cls, policy: dict[str, Any], tier: str) -> NotebookRules:
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r} is not one of {', '.join(TIERS)}")
        notebooks = policy.get("notebooks") or {}
        return cls(tier=tier, allow_comms=bool(notebooks.get("allow_comms", False)),
                   max_output_bytes=int(notebooks.get("max_output_kb", DEFAULT_MAX_OUTPUT_KB)) * 1024,
                   sdc=dict(policy["egress"]["sdc"]))


@dataclass(frozen=True)
class Rendered:
    """Output the platform made itself: a verified table or a DP answer, or a notice in its place."""

    text: str
    html: str | None = None
    rules: tuple[str, ...] = ()  # empty: platform content; else the rules that put a notice in its place
    details: dict[str, Any] = field(default_factory=dict)  # for the audit record: names and verdicts, no values


class PlatformOutputs(Protocol):
    """The platform side of verified outputs: it recomputes, records and renders; the kernel only asks."""

    def table(self, spec: Any, *, cell: str | None) -> Rendered:
        """The table `spec` asks for, recomputed from the dataset, checked, recorded; or a notice."""

    def dp_answer(self, reference: Any) -> Rendered:
        """The DP answer the platform recorded under `reference`; or a notice."""


@dataclass(frozen=True)
class Held:
    """An output withheld from the browser for a steward's review."""

    name: str  # a file name to store it under: safe characters only
    mime: str
    data: bytes
    rules: tuple[str, ...]  # the rules that sent it to review


@dataclass(frozen=True)
class Outcome:
    """What the bridge does with one message from the kernel."""

    action: str  # "pass", "replace" (send `message` instead), "drop" (send nothing), "defer" (run `work`)
    message: dict[str, Any] | None  # the replacement, for "replace"
    rules: tuple[str, ...]  # the rules that fired; empty on a clean pass
    held: tuple[Held, ...]
    audit: dict[str, Any] | None  # None: nothing to audit; never holds data values
    work: Callable[[], Outcome] | None = None  # for "defer": blocking platform work that yields the outcome


@dataclass(frozen=True)
class ClientRequest:
    """What the client sent: the only source of text the aggregate tier echoes."""

    msg_type: str
    header: dict[str, Any]
    code_lines: tuple[str, ...]
    execution_count: int | None
    expressions: tuple[str, ...]
    cursor_pos: int


def withheld_notice(rules: Iterable[str]) -> str:
    """The text shown where an output was withheld: rule names and what they guard against, no data."""
    return f"[sandbox] output withheld: {_named(rules)}. The steward can see the reason in the audit log.\n"


def review_notice(rules: Iterable[str]) -> str:
    return (f"[sandbox] output held for review: {_named(rules)}. A steward decides whether it is released; "
            "the reason is in the audit log.\n")


def figure_notice() -> str:
    return f"[sandbox] figure held for review: {RULE_FIGURE}. A steward decides whether it is released.\n"


def _named(rules: Iterable[str]) -> str:
    return "; ".join(f"{rule} ({RULE_SUMMARIES[rule]})" if rule in RULE_SUMMARIES else rule
                     for rule in dict.fromkeys(rules))


# -- reading a message -------------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return str(value)


def canonical_json(value: Any) -> str:
    """The canonical JSON the audit hashes and the platform signs: sorted keys, no spaces, UTF-8 as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _text(value: Any) -> str | None:
    """A mime value as text: a string, or nbformat's list of lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "".join(value)
    return None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class _Message:
    """One message from the kernel, with its content serialised once."""

    channel: str
    msg: dict[str, Any]
    msg_type: str
    header: dict[str, Any]
    parent_header: dict[str, Any]
    content: dict[str, Any]
    content_bytes: bytes
    buffers: list[Any]

    @classmethod
    def read(cls, channel: str, msg: dict[str, Any]) -> _Message | None:
        header, parent, metadata, content = (_dict(msg.get(key)) for key in
                                             ("header", "parent_header", "metadata", "content"))
        buffers = msg.get("buffers") or []
        if header is None or parent is None or metadata is None or content is None or not isinstance(buffers, list):
            return None
        try:
            content_json = canonical_json(content)
        except (TypeError, ValueError):  # unsortable keys or a cycle: not something Session decodes
            return None
        return cls(channel=channel, msg=msg, msg_type=str(header.get("msg_type") or msg.get("msg_type") or ""),
                   header=header, parent_header=parent, content=content,
                   content_bytes=content_json.encode("utf-8", "surrogatepass"), buffers=buffers)

    @property
    def parent_id(self) -> str | None:
        value = self.parent_header.get("msg_id")
        return value if isinstance(value, str) and _SAFE_ID.fullmatch(value) else None

    @property
    def output_bearing(self) -> bool:
        if self.msg_type == "execute_reply":
            return bool(self.content.get("user_expressions") or self.content.get("payload"))
        return self.msg_type not in STRUCTURAL_TYPES


# -- the filter --------------------------------------------------------------------------------------------------------


class MessageFilter:
    """Decides, message by message, what a session's kernels may send to the browser and hear from it."""

    def __init__(self, rules: NotebookRules, *, platform: PlatformOutputs | None = None,
                 signing_key: bytes | None = None) -> None:
        if rules.tier not in TIERS:
            raise ValueError(f"tier {rules.tier!r} is not one of {', '.join(TIERS)}")
        self.rules = rules
        self.platform = platform
        self._signing_key = signing_key or uuid.uuid4().bytes
        self._held_numbers = itertools.count(1)
        self._requests: OrderedDict[str, ClientRequest] = OrderedDict()
        self._counts: dict[str, int] = {}
        self._noticed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        self._session = uuid.uuid4().hex  # the platform's session id in the headers it writes

    # -- client -> kernel ------------------------------------------------------------------------------------------

    def incoming(self, channel: str, msg_type: str) -> str | None:
        """None when the browser may send this message type to the kernel, else the reason it may not."""
        if channel not in ("shell", "control", "stdin"):
            return f"the {channel!r} channel does not take requests"
        if msg_type in COMM_TYPES:
            if self.rules.tier == "aggregate":
                return "comms (widgets) carry what the kernel writes; they are off in the aggregate tier"
            return None if self.rules.allow_comms else "comms (widgets) are off for this session's policy"
        if msg_type == "debug_request":
            return None if self.rules.tier == "trusted" else \
                "the debugger reads the kernel's variables; only trusted sessions may use it"
        if msg_type not in CLIENT_REQUESTS:
            return f"{msg_type!r} is not a message type the sandbox relays"
        if (msg_type == "input_reply") != (channel == "stdin"):
            return f"{msg_type} does not travel on the {channel} channel"
        return None

    def remember(self, kernel: str, header: dict[str, Any], content: dict[str, Any]) -> None:
        """Note a request the client sent (after `incoming` allowed it): replies are built from it."""
        msg_id = header.get("msg_id")
        msg_type = str(header.get("msg_type", ""))
        if not isinstance(msg_id, str) or not _SAFE_ID.fullmatch(msg_id) or msg_type not in CLIENT_REQUESTS:
            return
        code = content.get("code") if isinstance(content.get("code"), str) else ""
        count = None
        with self._lock:
            if msg_type == "execute_request" and not content.get("silent") and content.get("store_history", True):
                count = self._counts[kernel] = self._counts.get(kernel, 0) + 1
            expressions = _dict(content.get("user_expressions")) or {}
            kept_header = {key: value for key, value in header.items()
                           if key in ("msg_id", "msg_type", "session", "username", "date", "version")
                           and isinstance(value, str | datetime)}
            self._requests[msg_id] = ClientRequest(
                msg_type=msg_type, header=kept_header, code_lines=tuple(str(code).splitlines()),
                execution_count=count, expressions=tuple(str(name) for name in expressions),
                cursor_pos=_integer(content.get("cursor_pos")) or 0)
            while len(self._requests) > MAX_REMEMBERED_REQUESTS:
                self._requests.popitem(last=False)

    def _request(self, message: _Message) -> ClientRequest | None:
        parent = message.parent_id
        if parent is None:
            return None
        with self._lock:
            return self._requests.get(parent)

    # -- kernel -> client ------------------------------------------------------------------------------------------

    def outgoing(self, channel: str, msg: dict[str, Any]) -> Outcome:
        """What to do with one message from the kernel."""
        message = _Message.read(channel, msg)
        if message is None:
            return Outcome("drop", None, (RULE_MALFORMED,), (), {
                "msg_type": "unknown", "channel": channel, "sha256": None, "size": None, "cell": None,
                "action": "drop", "rules": [RULE_MALFORMED]})
        if message.msg_type in DEBUG_TYPES and self.rules.tier != "trusted":
            return self._outcome(message, "drop", rules=(RULE_DEBUG,))
        if self.rules.tier == "aggregate":
            return self._aggregate(message)
        if message.msg_type in COMM_TYPES and not self.rules.allow_comms:
            return self._outcome(message, "drop", rules=(RULE_COMMS,))
        if message.msg_type == "status" or len(message.content_bytes) <= self.rules.max_output_bytes:
            return self._outcome(message, "pass")
        content = _notice_content(message.msg_type, message.content, withheld_notice([RULE_SIZE]))
        if content is None:
            return self._outcome(message, "drop", rules=(RULE_SIZE,))
        return self._outcome(message, "replace", content=content, rules=(RULE_SIZE,))

    # -- aggregate ---------------------------------------------------------------------------------------------

    def _aggregate(self, message: _Message) -> Outcome:
        """Only what the platform knows leaves: every message is rebuilt from platform values, or withheld."""
        msg_type, content = message.msg_type, message.content
        request = self._request(message)
        if msg_type == "status":
            state = content.get("execution_state")
            if state not in RELAYED_STATES:
                return self._outcome(message, "drop", rules=(RULE_STATE,))
            return self._rebuilt(message, request, {"execution_state": state})
        if msg_type in COMM_TYPES:
            return self._outcome(message, "drop", rules=(RULE_COMMS,))
        if msg_type not in KNOWN_KERNEL_TYPES:
            return self._outcome(message, "drop", rules=(RULE_UNVERIFIED,))
        if request is None:  # no client asked for this: nothing to attach it to, nothing to show
            return self._outcome(message, "drop", rules=(RULE_UNVERIFIED,))
        if msg_type in ("display_data", "execute_result"):
            return self._bundle(message, request)
        if msg_type == "error":
            return self._rebuilt(message, request, self._error(content, request), rules=(RULE_UNVERIFIED,))
        if msg_type == "execute_reply":
            status = content.get("status") if content.get("status") in REPLY_STATUSES else "error"
            reply: dict[str, Any] = {
                "status": status, "execution_count": request.execution_count, "payload": [],
                "user_expressions": {name: _withheld_expression(withheld_notice([RULE_UNVERIFIED]))
                                     for name in request.expressions}}
            if status == "error":
                reply.update(self._error(content, request))
            fired = (RULE_UNVERIFIED,) if message.output_bearing or status == "error" else ()
            return self._rebuilt(message, request, reply, rules=fired)
        if msg_type == "execute_input":
            return self._rebuilt(message, request, {"code": "\n".join(request.code_lines),
                                                    "execution_count": request.execution_count})
        if msg_type == "kernel_info_reply":
            return self._rebuilt(message, request, dict(KERNEL_INFO))
        if msg_type == "is_complete_reply":
            state = content.get("status") if content.get("status") in COMPLETENESS else "unknown"
            return self._rebuilt(message, request, {"status": state, **({"indent": ""} if state == "incomplete"
                                                                         else {})})
        if msg_type == "comm_info_reply":
            return self._rebuilt(message, request, {"status": "ok", "comms": {}})
        if msg_type == "shutdown_reply":
            return self._rebuilt(message, request, {"status": "ok", "restart": bool(content.get("restart"))})
        if msg_type == "interrupt_reply":
            return self._rebuilt(message, request, {"status": "ok"})
        if msg_type == "clear_output":
            return self._rebuilt(message, request, {"wait": bool(content.get("wait"))})
        if msg_type == "update_display_data":  # the display it updates was withheld already
            return self._outcome(message, "drop", rules=(RULE_UNVERIFIED,), cell=request)
        notice = withheld_notice([RULE_UNVERIFIED])
        if msg_type == "stream":
            if self._noticed_before(request, "stream"):  # one notice per cell, not one per print
                return self._outcome(message, "drop", rules=(RULE_UNVERIFIED,), cell=request)
            name = content.get("name") if content.get("name") in ("stdout", "stderr") else "stdout"
            return self._rebuilt(message, request, {"name": name, "text": notice}, rules=(RULE_UNVERIFIED,))
        replies: dict[str, dict[str, Any]] = {
            "inspect_reply": {"status": "ok", "found": True, "data": {"text/plain": notice}, "metadata": {}},
            "complete_reply": {"status": "ok", "matches": [], "cursor_start": request.cursor_pos,
                               "cursor_end": request.cursor_pos, "metadata": {}},
            "history_reply": {"status": "ok", "history": []},
            # The kernel waits for an answer, so the prompt must arrive.
            "input_request": {"prompt": notice, "password": bool(content.get("password"))},
        }
        replaced = replies.get(msg_type)
        if replaced is None:
            return self._outcome(message, "drop", rules=(RULE_UNVERIFIED,), cell=request)
        return self._rebuilt(message, request, replaced, rules=(RULE_UNVERIFIED,))

    def _noticed_before(self, request: ClientRequest, kind: str) -> bool:
        key = (str(request.header.get("msg_id")), kind)
        with self._lock:
            if key in self._noticed:
                return True
            self._noticed[key] = None
            while len(self._noticed) > MAX_REMEMBERED_REQUESTS:
                self._noticed.popitem(last=False)
        return False

    def _bundle(self, message: _Message, request: ClientRequest) -> Outcome:
        """A display: the platform's table or DP answer, a figure held for review, or a notice."""
        data = _dict(message.content.get("data")) or {}
        platform = self.platform
        if TABLE_SPEC_MIME in data and platform is not None:
            spec = data[TABLE_SPEC_MIME]
            cell = request.header.get("msg_id")

            def verify() -> Outcome:
                try:
                    rendered = platform.table(spec, cell=cell if isinstance(cell, str) else None)
                except Exception:  # the platform's failure must not show the kernel's bytes either
                    rendered = Rendered(text=withheld_notice([RULE_TABLE_SPEC]), rules=(RULE_TABLE_SPEC,))
                return self._platform_display(message, request, rendered)

            return Outcome("defer", None, (), (), None, work=verify)
        if DP_ANSWER_MIME in data and platform is not None:
            return self._platform_display(message, request, platform.dp_answer(data[DP_ANSWER_MIME]))
        held = [Held(self._held_name(request, FIGURE_MIMES[mime]), mime, _figure_bytes(mime, value), (RULE_FIGURE,))
                for mime, value in data.items() if mime in FIGURE_MIMES]
        if held:
            return self._display(message, request, figure_notice(), rules=(RULE_FIGURE,), held=held)
        return self._display(message, request, withheld_notice([RULE_UNVERIFIED]), rules=(RULE_UNVERIFIED,))

    def _platform_display(self, message: _Message, request: ClientRequest, rendered: Rendered) -> Outcome:
        if rendered.rules:
            return self._display(message, request, rendered.text, rules=rendered.rules, details=rendered.details)
        data = {"text/plain": rendered.text, **({"text/html": rendered.html} if rendered.html is not None else {})}
        return self._display(message, request, data, rules=(), details=rendered.details, signed=True)

    def _display(self, message: _Message, request: ClientRequest, shown: str | dict[str, str], *,
                 rules: tuple[str, ...], held: Iterable[Held] = (), details: dict[str, Any] | None = None,
                 signed: bool = False) -> Outcome:
        """A display_data or execute_result of the platform's making (no display id: that is the kernel's)."""
        data = {"text/plain": shown} if isinstance(shown, str) else dict(shown)
        content: dict[str, Any] = {"data": data, "metadata": self.signature(data) if signed else {}}
        if message.msg_type == "execute_result":
            content["execution_count"] = request.execution_count
        return self._rebuilt(message, request, content, rules=rules, held=held, details=details)

    def _error(self, content: dict[str, Any], request: ClientRequest) -> dict[str, Any]:
        """The exception's type (if Python's own) and the buyer's own line, from the code the client sent."""
        name = content.get("ename")
        shown = name if isinstance(name, str) and name in SHOWN_EXCEPTIONS else "Exception"
        line = _cell_line(content.get("traceback"), len(request.code_lines))
        where = "the cell"
        if line is not None:
            code = request.code_lines[line - 1].strip()
            code = code if len(code) <= MAX_SHOWN_LINE else code[:MAX_SHOWN_LINE] + "..."
            where = f"line {line}: {code}"
        text = f"{shown} at {where}\n[sandbox] the message and traceback are withheld: {RULE_UNVERIFIED}."
        return {"ename": shown, "evalue": "(withheld)", "traceback": [text]}

    def _rebuilt(self, message: _Message, request: ClientRequest | None, content: dict[str, Any], *,
                 rules: tuple[str, ...] = (), held: Iterable[Held] = (),
                 details: dict[str, Any] | None = None) -> Outcome:
        """A message of the platform's making: its header, the client's own request as parent, no metadata."""
        header = {"msg_id": uuid.uuid4().hex, "msg_type": message.msg_type, "username": "sandbox",
                  "session": self._session, "date": datetime.now(UTC), "version": "5.3"}
        replacement = {"header": header, "parent_header": dict(request.header) if request is not None else {},
                       "metadata": {}, "content": content, "buffers": [], "msg_id": header["msg_id"],
                       "msg_type": message.msg_type, "channel": message.channel}
        return self._outcome(message, "replace", rules=rules, held=held, replacement=replacement, cell=request,
                             details=details)

    def _held_name(self, request: ClientRequest, extension: str) -> str:
        cell = _SAFE_NAME_CHARS.sub("", str(request.header.get("msg_id") or ""))[:8] or "unknown"
        return f"cell-{cell}-{next(self._held_numbers)}.{extension}"

    # -- platform signatures ---------------------------------------------------------------------------------

    def signature(self, data: dict[str, Any]) -> dict[str, Any]:
        """Output metadata that marks a bundle as the platform's own, so that a saved notebook may keep it."""
        digest = hmac.new(self._signing_key, canonical_json(data).encode(), hashlib.sha256).hexdigest()
        return {"sandbox": {"platform": digest}}

    def signed(self, data: Any, metadata: Any) -> bool:
        """Whether the bundle is one the platform rendered (its signature matches its data)."""
        mark = _dict(metadata.get("sandbox")) if isinstance(metadata, dict) else None
        digest = mark.get("platform") if mark is not None else None
        if not isinstance(data, dict) or not isinstance(digest, str):
            return False
        return hmac.compare_digest(self.signature(data)["sandbox"]["platform"], digest)

    def stored_output(self, output: dict[str, Any]) -> dict[str, Any] | None:
        """An output kept in a saved notebook, as it may be served: None keeps it; else its replacement."""
        kind = str(output.get("output_type", ""))
        if self.rules.tier != "aggregate":
            content = {key: value for key, value in output.items() if key != "output_type"}
            msg = {"header": {"msg_type": kind}, "parent_header": {}, "metadata": {}, "content": content,
                   "buffers": []}
            outcome = self.outgoing("iopub", msg)
            if outcome.action == "pass":
                return None
            replaced = outcome.message["content"] if outcome.message is not None else {}
            return {"output_type": kind, **replaced}
        if kind in ("display_data", "execute_result") and self.signed(output.get("data"), output.get("metadata")):
            return None
        notice = withheld_notice([RULE_UNVERIFIED])
        if kind == "error":
            name = output.get("ename")
            shown = name if isinstance(name, str) and name in SHOWN_EXCEPTIONS else "Exception"
            return {"output_type": "error", "ename": shown, "evalue": "(withheld)", "traceback": [notice]}
        if kind == "execute_result":
            return {"output_type": kind, "data": {"text/plain": notice}, "metadata": {},
                    "execution_count": _integer(output.get("execution_count"))}
        return {"output_type": "stream", "name": "stdout", "text": notice}

    # -- outcome -----------------------------------------------------------------------------------------------

    def _outcome(self, message: _Message, action: str, *, content: dict[str, Any] | None = None,
                 rules: tuple[str, ...] = (), held: Iterable[Held] = (),
                 replacement: dict[str, Any] | None = None, cell: ClientRequest | None = None,
                 details: dict[str, Any] | None = None) -> Outcome:
        """The outcome, its replacement message built from `content` unless given, and its audit record."""
        if action == "replace" and replacement is None:
            assert content is not None
            replacement = {**message.msg, "content": content, "buffers": [], "msg_type": message.msg_type}
        rules = tuple(dict.fromkeys(rules))
        audit = None
        if message.output_bearing or rules:
            # The cell is the client's request id when the platform knows the request; a kernel-chosen parent
            # id is audited only where the kernel is trusted with output anyway.
            parent = cell.header.get("msg_id") if cell is not None else (
                message.parent_id if self.rules.tier != "aggregate" else None)
            audit = {
                "msg_type": message.msg_type if message.msg_type in KNOWN_KERNEL_TYPES else "unknown",
                "channel": message.channel,
                "sha256": hashlib.sha256(message.content_bytes).hexdigest(),
                "size": len(message.content_bytes),
                "cell": parent,
                "action": action,
                "rules": list(rules),
                **(details or {}),
            }
        return Outcome(action, replacement if action == "replace" else None, rules, tuple(held), audit)


# -- content (pure) ----------------------------------------------------------------------------------------------------


def _cell_line(traceback: Any, lines: int) -> int | None:
    """The cell's line the traceback names first (the outermost frame is the cell), if within the cell."""
    if not isinstance(traceback, list) or not lines:
        return None
    text = _ANSI.sub("", "\n".join(str(part) for part in traceback[:200]))[:200_000]
    match = _CELL_LINE.search(text)
    if match is None:
        return None
    number = int(match.group(1) or match.group(2))
    return number if 1 <= number <= lines else None


def _figure_bytes(mime: str, value: Any) -> bytes:
    text = _text(value)
    if text is None:
        return canonical_json(value).encode()
    if mime in BASE64_MIMES:
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            pass
    return text.encode("utf-8", "surrogatepass")


def _withheld_expression(notice: str) -> dict[str, Any]:
    return {"status": "error", "ename": "OutputWithheld", "evalue": notice, "traceback": []}


def _notice_content(msg_type: str, content: dict[str, Any], notice: str) -> dict[str, Any] | None:
    """The content of a message of this type that shows `notice` in place of its output; None if none can."""
    if msg_type == "stream":
        name = content.get("name")
        return {"name": name if name in ("stdout", "stderr") else "stdout", "text": notice}
    if msg_type in BUNDLE_TYPES:
        replaced: dict[str, Any] = {"data": {"text/plain": notice}, "metadata": {}}
        transient = _dict(content.get("transient"))
        if transient is not None:  # update_display_data finds its output by display_id
            replaced["transient"] = {key: value for key, value in transient.items() if key == "display_id"}
        if msg_type == "execute_result":
            replaced["execution_count"] = _integer(content.get("execution_count"))
        return replaced
    if msg_type == "error":
        return {"ename": "OutputWithheld", "evalue": notice, "traceback": [notice]}
    if msg_type == "execute_reply":
        status = content.get("status")
        status = status if status in REPLY_STATUSES else "error"
        expressions = _dict(content.get("user_expressions")) or {}
        replaced = {"status": status, "execution_count": _integer(content.get("execution_count")),
                    "user_expressions": {str(name): _withheld_expression(notice) for name in expressions},
                    "payload": []}
        if status == "error":
            replaced.update(ename="OutputWithheld", evalue=notice, traceback=[notice])
        return replaced
    if msg_type == "inspect_reply":
        return {"status": "ok", "found": True, "data": {"text/plain": notice}, "metadata": {}}
    if msg_type == "complete_reply":
        return {"status": "ok", "matches": [], "cursor_start": _integer(content.get("cursor_start")) or 0,
                "cursor_end": _integer(content.get("cursor_end")) or 0, "metadata": {}}
    if msg_type == "history_reply":
        return {"status": "ok", "history": []}
    if msg_type == "input_request":
        return {"prompt": notice, "password": bool(content.get("password"))}
    if msg_type == "execute_input":
        return {"code": "# " + notice, "execution_count": _integer(content.get("execution_count"))}
    return None


def render_rows(columns: list[str], rows: list[list[Any]], caption: str) -> Rendered:
    """A small table of platform values as text and escaped HTML."""
    cells = [[_cell_text(value) for value in row] for row in rows]
    grid = [columns, *cells]
    widths = [max(len(row[i]) for row in grid if i < len(row)) for i in range(len(columns))]
    text = caption + "\n" + "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=False))
                                      for row in grid)
    head = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in cells)
    markup = (f'<table class="sandbox-verified"><caption>{html.escape(caption)}</caption>'
              f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return Rendered(text=text, html=markup)


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.6g}"
    return str(value)

