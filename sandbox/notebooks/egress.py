"""Notebook egress: what each message leaving a kernel may carry to the buyer's browser.

The kernel runs the buyer's code beside the data, so every field of every message it sends is hostile.
The websocket bridge decodes each message and asks `MessageFilter.outgoing`, which answers pass, replace
(a notice instead of what was withheld) or drop, names the rules that fired, hands figures and tables
that need a person to the steward's queue (`Held`), and describes the message for the audit log by hash,
size and cell, never by value. Requests from the browser meet `MessageFilter.incoming` first.

What an output meets depends on the session's tier:

- **dp_only** and **trusted**: outputs pass (a dp_only kernel sees only noisy answers; a trusted buyer is
  vetted) and each one is audited. The size limit and the comms rule still apply; only trusted sessions
  may use the debugger.
- **aggregate**: one leak scan over the whole message (header, parent header, metadata, content) against
  the dataset version's fingerprints, the table disclosure checks on every HTML or JSON table, figures
  held for review, and mime types the checks do not understand removed.

The scan sees JSON-decoded text (escapes, ANSI colours, zero-width and full-width characters undone), so
quoting and terminal formatting do not hide values; a buyer who deliberately encodes rows (shifted digits,
base64) is beyond any scanner, which is why the strictest datasets are dp_only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import itertools
import json
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from sandbox.egress.leaks import FingerprintIndex, leak_verdict
from sandbox.egress.tables import SUPPRESSION_MARKER, TableFacts, check_table, parse_table
from sandbox.egress.verdicts import CheckResult, Verdict

TIERS = ("dp_only", "aggregate", "trusted")
DEFAULT_MAX_OUTPUT_KB = 256

# Rule names, as the audit log and the notices show them.
RULE_SIZE = "notebook-output-size"
RULE_COMMS = "notebook-comms"
RULE_DEBUG = "notebook-debug"
RULE_FIGURE = "notebook-figure"
RULE_MIME = "notebook-mime"
RULE_BUFFERS = "notebook-buffers"
RULE_MALFORMED = "notebook-malformed"
RULE_LEAK = "leak-scan"
RULE_NO_INDEX = "leak-scan-unavailable"

# What each rule guards against, in words that quote no data: the notices name rules with these.
RULE_SUMMARIES = {
    RULE_SIZE: "larger than the policy's notebook output limit",
    RULE_COMMS: "comms are off for this session",
    RULE_DEBUG: "the debugger is off for this session",
    RULE_FIGURE: "figures are released by a steward",
    RULE_MIME: "an output type the checks do not cover",
    RULE_BUFFERS: "binary buffers are off for this session",
    RULE_MALFORMED: "a malformed message",
    RULE_LEAK: "dataset rows or ids found",
    RULE_NO_INDEX: "the dataset's leak-scan index is unavailable",
    "min-cell-count": "a cell counts fewer records than the policy's minimum",
    "zeros": "zero cells",
    "rounding": "counts not rounded as the policy asks",
    "dominance": "cells dominated by a few contributors",
    "p-ratio": "cells that let one contributor estimate another",
    "count-plausibility": "numbers that may be record-level values",
    "magnitude-unverified": "sums or means that cannot be verified",
    "table-cells": "a table without numeric cells",
    "provenance": "a table that cannot be verified",
    "provenance-match": "a table that does not match the dataset",
    "residual-df": "too few residual degrees of freedom",
    "dp-result": "a declared DP result",
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
EXECUTION_STATES = frozenset({"starting", "busy", "idle", "restarting", "dead"})
REPLY_STATUSES = frozenset({"ok", "error", "aborted"})
FIGURE_MIMES = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg", "application/pdf": "pdf"}
BASE64_MIMES = frozenset({"image/png", "image/jpeg", "application/pdf"})
TEXT_MIMES = frozenset({"text/plain", "text/markdown", "text/latex", "text/html", "application/json"})
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# Mime types a browser renders as HTML: markup can split a value the raw scan would see whole.
MARKUP_MIMES = ("text/html", "text/markdown")

# JSON escapes of the canonical form, undone for the scan: one C-level pass. The escaped backslash comes
# first in the alternation, so `\\n` (a backslash, then n) is never read as a line break. ANSI colour
# codes (`\u001b[0;31m`) would glue themselves to the value they colour ("31m72"), so they go too.
_ESCAPES = re.compile(rb'\\(?:u001b\[[0-9;?]*[ -/]*[@-~]|u00[0-9a-fA-F]{2}|["\\/bfrt])')
_INVISIBLE = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad")
# Inline tags and comments render as nothing: `7<span></span>2` shows as 72.
_INLINE = ("a", "abbr", "b", "bdi", "bdo", "big", "cite", "code", "data", "del", "dfn", "em", "font", "i", "ins", "kbd",
           "mark", "q", "s", "samp", "small", "span", "strike", "strong", "sub", "sup", "time", "tt", "u", "var", "wbr")
_INLINE_TAGS = frozenset(_INLINE)
_INLINE_MARKUP = re.compile(r"<!--.*?-->|</?(?:" + "|".join(_INLINE) + r")\b[^>]*>", re.IGNORECASE | re.DOTALL)
_TAG_NAME = re.compile(r"</?([A-Za-z][A-Za-z0-9]*)")
_TABLE_TAG = re.compile(r"<table\b", re.IGNORECASE)
_BETWEEN_TAGS = re.compile(r">\s+<")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:[,_ \u00a0\u202f]\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_THOUSANDS = str.maketrans({",": None, "_": None, " ": None, "\u00a0": None, "\u202f": None, "\u2212": "-"})
_MISSING_CELLS = frozenset({"...", "\u2026", "<na>", "nat"})
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9-]")
MAX_SPAN = 1000  # a hostile colspan must not build a million-cell grid
MAX_CELLS = 1_000_000


def _needs_rendering(text: str) -> bool:
    """Whether entities, comments or inline tags could split a value (a set lookup per tag name is several
    times faster than one regular expression that tries every inline tag at every `<`)."""
    return "&" in text or "<!--" in text or any(name.lower() in _INLINE_TAGS for name in _TAG_NAME.findall(text))


@dataclass(frozen=True)
class NotebookRules:
    """What the session's policy and tier say about notebook outputs."""

    tier: str  # "dp_only" | "aggregate" | "trusted"
    allow_comms: bool
    max_output_bytes: int
    block_rows: int
    block_ids: int
    sdc: dict[str, Any]

    @classmethod
    def from_policy(cls, policy: dict[str, Any], tier: str) -> NotebookRules:
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r} is not one of {', '.join(TIERS)}")
        notebooks = policy.get("notebooks") or {}
        leak_scan = policy["egress"]["leak_scan"]
        return cls(tier=tier, allow_comms=bool(notebooks.get("allow_comms", False)),
                   max_output_bytes=int(notebooks.get("max_output_kb", DEFAULT_MAX_OUTPUT_KB)) * 1024,
                   block_rows=int(leak_scan["block_rows"]), block_ids=int(leak_scan["block_ids"]),
                   sdc=dict(policy["egress"]["sdc"]))


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

    action: str  # "pass" (send unchanged), "replace" (send `message` instead), "drop" (send nothing)
    message: dict[str, Any] | None  # the replacement, for "replace"
    rules: tuple[str, ...]  # the rules that fired; empty on a clean pass
    held: tuple[Held, ...]
    audit: dict[str, Any] | None  # None: nothing to audit; never holds data values


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


def _canonical(value: Any) -> str:
    """The canonical JSON the audit hashes: sorted keys, no spaces, UTF-8 as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _scannable(text: str) -> bytes:
    """Canonical JSON as the reader of the rendered output would see its text, for the leak scan."""
    if not text.isascii():
        # Full-width digits and ligatures read as the plain ones; zero-width characters read as nothing.
        text = unicodedata.normalize("NFKC", text)
        for invisible in _INVISIBLE:
            text = text.replace(invisible, "")
    data = text.encode("utf-8", "surrogatepass")
    return _ESCAPES.sub(b" ", data).replace(b"\\n", b"\n")


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
    metadata: dict[str, Any]
    content: dict[str, Any]
    content_json: str
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
            content_json = _canonical(content)
        except (TypeError, ValueError):  # unsortable keys or a cycle: not something Session decodes
            return None
        return cls(channel=channel, msg=msg, msg_type=str(header.get("msg_type") or msg.get("msg_type") or ""),
                   header=header, parent_header=parent, metadata=metadata, content=content,
                   content_json=content_json, content_bytes=content_json.encode("utf-8", "surrogatepass"),
                   buffers=buffers)

    @property
    def output_bearing(self) -> bool:
        if self.msg_type == "execute_reply":
            return bool(self.content.get("user_expressions") or self.content.get("payload"))
        return self.msg_type not in STRUCTURAL_TYPES

    def envelope_json(self) -> str:
        return _canonical({"header": self.header, "parent_header": self.parent_header, "metadata": self.metadata})


# -- tables in HTML ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _HtmlCell:
    header: bool
    colspan: int
    rowspan: int
    text: list[str]


@dataclass
class _HtmlTable:
    rows: list[tuple[bool, list[_HtmlCell]]]  # (in <thead>, cells)
    row: list[_HtmlCell] | None = None
    cell: _HtmlCell | None = None
    in_head: bool = False


# One pass over a document's tags and text: a tag (`<td colspan="2">`, `</tr>`, `<br/>`), a run of text, or a
# lone `<` that starts no tag (read as text). Much faster than html.parser on pandas' regular markup, and
# it is only used to find table cells: anything it reads differently only makes a cell less numeric.
_MARKUP = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)\b([^>]*)>|([^<]+)|(<)")
_SPAN_ATTRIBUTE = re.compile(r"\b(colspan|rowspan)\s*=\s*[\"']?\s*(\d+)", re.IGNORECASE)


class _TableParser:
    """The cells of every <table> in a document (pandas' DataFrame and Styler HTML among them)."""

    def __init__(self) -> None:
        self.tables: list[list[tuple[bool, list[_HtmlCell]]]] = []
        self._open: list[_HtmlTable] = []
        self._skipping = 0

    def feed(self, document: str) -> None:
        for match in _MARKUP.finditer(document):
            closing, tag, attributes, text, stray = match.groups()
            if tag is not None:
                tag = tag.lower()
                if closing:
                    self.handle_endtag(tag)
                else:
                    spans = [(name.lower(), value) for name, value in _SPAN_ATTRIBUTE.findall(attributes or "")]
                    self.handle_starttag(tag, spans)
            else:
                self.handle_data(html.unescape(text) if text is not None else stray)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script"):
            self._skipping += 1
        elif tag == "table":
            self._open.append(_HtmlTable(rows=[]))
        elif not self._open:
            return
        elif tag == "thead":
            self._open[-1].in_head = True
        elif tag in ("tbody", "tfoot"):
            self._open[-1].in_head = False
        elif tag == "tr":
            self._end_row()
            self._open[-1].row = []
        elif tag in ("th", "td"):
            table = self._open[-1]
            self._end_cell()
            if table.row is None:
                table.row = []
            spans = dict(attrs)
            table.cell = _HtmlCell(header=tag == "th", colspan=_span(spans.get("colspan")),
                                   rowspan=_span(spans.get("rowspan")), text=[])
        elif tag == "br" and self._open[-1].cell is not None:
            self._open[-1].cell.text.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script"):
            self._skipping = max(self._skipping - 1, 0)
        elif not self._open:
            return
        elif tag in ("th", "td"):
            self._end_cell()
        elif tag == "tr":
            self._end_row()
        elif tag == "thead":
            self._open[-1].in_head = False
        elif tag == "table":
            self._end_row()
            self.tables.append(self._open.pop().rows)

    def handle_data(self, data: str) -> None:
        if self._open and not self._skipping and self._open[-1].cell is not None:
            self._open[-1].cell.text.append(data)

    def close(self) -> None:
        while self._open:
            self._end_row()
            self.tables.append(self._open.pop().rows)

    def _end_cell(self) -> None:
        table = self._open[-1]
        if table.cell is not None and table.row is not None:
            table.row.append(table.cell)
        table.cell = None

    def _end_row(self) -> None:
        self._end_cell()
        table = self._open[-1]
        if table.row:
            table.rows.append((table.in_head, table.row))
        table.row = None


def _span(raw: str | None) -> int:
    try:
        return min(max(int(raw or 1), 1), MAX_SPAN)
    except ValueError:
        return 1


_ROW_OR_CELL = re.compile(r"<tr\b|<(t[hd])\b([^>]*)>(.*?)</t[hd]\s*>", re.IGNORECASE | re.DOTALL)
_ANY_TAG = re.compile(r"<[^>]*>")
_BREAK = re.compile(r"<br\b[^>]*>", re.IGNORECASE)
_IRREGULAR = ("<script", "<style", "<table", "<tfoot", "<!--")


def html_tables(document: str) -> list[pa.Table]:
    """Every table in an HTML document as columns: header names from <th>, index columns as text,
    numbers parsed where every filled cell of a column is one."""
    tables = _regular_tables(document)
    if tables is None:
        parser = _TableParser()
        # Whitespace between tags is pandas' indentation: dropping it spares the parser most of its calls.
        parser.feed(_BETWEEN_TAGS.sub("><", document))
        parser.close()
        tables = parser.tables
    frames = []
    for rows in tables:
        frame = _frame(rows)
        if frame is not None:
            frames.append(frame)
    return frames


def _regular_tables(document: str) -> list[list[tuple[bool, list[_HtmlCell]]]] | None:
    """The cells of markup as regular as pandas writes it, by string searches and one expression (the notebook's
    common case, several times faster); None when anything is irregular, for the tag-by-tag parser."""
    lowered = document.lower()
    if lowered.count("<table") != lowered.count("</table") or lowered.count("<tr") != lowered.count("</tr"):
        return None
    tables: list[list[tuple[bool, list[_HtmlCell]]]] = []
    position = 0
    while (start := lowered.find("<table", position)) >= 0:  # plain searches: no regex backtracking
        open_end = lowered.find(">", start)
        close = lowered.find("</table", open_end)
        if open_end < 0 or close < 0:
            return None
        position = close + len("</table")
        inner, low_inner = document[open_end + 1:close], lowered[open_end + 1:close]
        if any(marker in low_inner for marker in _IRREGULAR):
            return None  # nested tables, scripts or comments: the full parser knows what they mean
        head_stop = low_inner.find("</thead")
        rows: list[tuple[bool, list[_HtmlCell]]] = []
        cells: list[_HtmlCell] | None = None
        for token in _ROW_OR_CELL.finditer(inner):  # one pass: a row starts, or a whole cell
            tag, attributes, text = token.groups()
            if tag is None:
                cells = []
                rows.append((token.start() < head_stop, cells))
                continue
            if cells is None:
                continue  # a cell outside any row
            colspan = rowspan = 1
            if "span" in attributes.lower():
                spans = {name.lower(): value for name, value in _SPAN_ATTRIBUTE.findall(attributes)}
                colspan, rowspan = _span(spans.get("colspan")), _span(spans.get("rowspan"))
            if "<" in text:
                text = _ANY_TAG.sub("", _BREAK.sub(" ", text))
            if "&" in text:
                text = html.unescape(text)
            cells.append(_HtmlCell(header=tag.lower() == "th", colspan=colspan, rowspan=rowspan, text=[text]))
        rows = [(in_head, row) for in_head, row in rows if row]
        tables.append(rows)
    return tables


def _grid(rows: list[tuple[bool, list[_HtmlCell]]]) -> list[tuple[bool, list[tuple[bool, str]]]]:
    """Rows of (is <th>, text) with row and column spans spread over the cells they cover."""
    grid: list[tuple[bool, list[tuple[bool, str]]]] = []
    if all(cell.colspan == 1 and cell.rowspan == 1 for _, row in rows for cell in row):  # pandas' usual case
        cells = 0
        for in_head, row in rows:
            cells += len(row)
            if cells > MAX_CELLS:
                break
            grid.append((in_head, [(cell.header, " ".join("".join(cell.text).split())) for cell in row]))
        return grid
    pending: dict[int, tuple[int, tuple[bool, str]]] = {}  # column -> (rows left, cell) from a rowspan above
    cells = 0
    for in_head, row in rows:
        out: list[tuple[bool, str]] = []
        queue = iter(row)
        column = 0
        while True:
            if column in pending:
                left, value = pending[column]
                out.append(value)
                if left <= 1:
                    del pending[column]
                else:
                    pending[column] = (left - 1, value)
                column += 1
                continue
            cell = next(queue, None)
            if cell is None:
                if any(key >= column for key in pending):
                    out.append((False, ""))
                    column += 1
                    continue
                break
            value = (cell.header, " ".join("".join(cell.text).split()))
            for _ in range(cell.colspan):
                out.append(value)
                if cell.rowspan > 1:
                    pending[column] = (cell.rowspan - 1, value)
                column += 1
        cells += len(out)
        if cells > MAX_CELLS:
            break
        grid.append((in_head, out))
    return grid


def _frame(rows: list[tuple[bool, list[_HtmlCell]]]) -> pa.Table | None:
    grid = _grid(rows)
    if any(in_head for in_head, _ in grid):
        head = [cells for in_head, cells in grid if in_head]
        body = [cells for in_head, cells in grid if not in_head]
    else:  # no <thead>: the leading rows of <th> only are the header
        split = next((i for i, (_, cells) in enumerate(grid) if not all(is_th for is_th, _ in cells)), len(grid))
        head = [cells for _, cells in grid[:split]]
        body = [cells for _, cells in grid[split:]]
    if not body:
        return None
    width = max(len(cells) for cells in [*head, *body])
    index_width = min(next((i for i, (is_th, _) in enumerate(cells) if not is_th), len(cells)) for cells in body)
    index_width = min(index_width, width)
    names: list[str] = []
    for column in range(width):
        parts = [cells[column][1] for cells in head if column < len(cells) and cells[column][1]]
        if column < index_width:
            # pandas puts the column axis' name above the index and the index names in a row of their own.
            name = parts[-1] if parts else "index"
        else:
            name = "|".join(dict.fromkeys(parts)) or f"column {column}"
        names.append(name)
    names = _unique(names)
    arrays = []
    for column in range(width):
        texts = [cells[column][1] if column < len(cells) else "" for cells in body]
        arrays.append(pa.array(texts, pa.string()) if column < index_width else _column(texts))
    return pa.Table.from_arrays(arrays, names=names)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if not count else f"{name} ({count + 1})")
    return unique


def _column(texts: list[str]) -> pa.Array:
    """Numbers where every filled cell is one (blanks, suppression markers and pandas' ... are gaps), else text."""
    values: list[float | None] = []
    for text in texts:
        if text.isascii() and text.isdigit():  # a plain count: the common case, without the patterns
            values.append(float(text))
        elif text.lower() in _MISSING_CELLS or SUPPRESSION_MARKER.match(text):
            values.append(None)
        elif _NUMBER.fullmatch(text.replace("\u2212", "-")):
            values.append(float(text.translate(_THOUSANDS)))
        else:
            return pa.array(texts, pa.string())
    if all(value is None for value in values):
        return pa.array(texts, pa.string())
    if all(value is None or value.is_integer() for value in values):
        return pa.array([None if value is None else int(value) for value in values], pa.int64())
    return pa.array(values, pa.float64())


# -- the filter --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shaped:
    """A message's content as it would leave after the mime and table rules, before the leak scan's word."""

    content: dict[str, Any]
    rules: tuple[str, ...]
    held: tuple[Held, ...]


class MessageFilter:
    """Decides, message by message, what a session's kernels may send to the browser and hear from it."""

    def __init__(self, rules: NotebookRules, *, index: FingerprintIndex | None, dataset_parquet: Path | None,
                 card: dict[str, Any] | None) -> None:
        if rules.tier not in TIERS:
            raise ValueError(f"tier {rules.tier!r} is not one of {', '.join(TIERS)}")
        self.rules = rules
        self.index = index
        self.dataset_parquet = dataset_parquet
        self.card = card
        self._held_numbers = itertools.count(1)

    # -- client -> kernel ------------------------------------------------------------------------------------------

    def incoming(self, channel: str, msg_type: str) -> str | None:
        """None when the browser may send this message type to the kernel, else the reason it may not."""
        if channel not in ("shell", "control", "stdin"):
            return f"the {channel!r} channel does not take requests"
        if msg_type in COMM_TYPES:
            return None if self.rules.allow_comms else "comms (widgets) are off for this session's policy"
        if msg_type == "debug_request":
            return None if self.rules.tier == "trusted" else \
                "the debugger reads the kernel's variables; only trusted sessions may use it"
        if msg_type not in CLIENT_REQUESTS:
            return f"{msg_type!r} is not a message type the sandbox relays"
        if (msg_type == "input_reply") != (channel == "stdin"):
            return f"{msg_type} does not travel on the {channel} channel"
        return None

    # -- files -----------------------------------------------------------------------------------------------------

    def scan_text(self, data: bytes) -> tuple[str, ...]:
        """The rules that withhold a workspace text file (the contents API serves it only if none)."""
        if self.rules.tier != "aggregate":
            return ()
        if self.index is None:
            return (RULE_NO_INDEX,)
        text = data.decode("utf-8", "replace")
        return (RULE_LEAK,) if self._leaks(self.index, _scannable(text)) else ()

    # -- kernel -> client ------------------------------------------------------------------------------------------

    def outgoing(self, channel: str, msg: dict[str, Any]) -> Outcome:
        """What to do with one message from the kernel."""
        message = _Message.read(channel, msg)
        if message is None:
            return Outcome("drop", None, (RULE_MALFORMED,), (), {
                "msg_type": "unknown", "channel": channel, "sha256": None, "size": None, "cell": None,
                "action": "drop", "rules": [RULE_MALFORMED]})
        if message.msg_type == "status":
            return self._status(message)
        if message.msg_type in COMM_TYPES and not self.rules.allow_comms:
            return self._outcome(message, "drop", rules=(RULE_COMMS,))
        if message.msg_type in DEBUG_TYPES and self.rules.tier != "trusted":
            return self._outcome(message, "drop", rules=(RULE_DEBUG,))
        oversized = len(message.content_bytes) > self.rules.max_output_bytes
        if self.rules.tier != "aggregate":
            if oversized:
                return self._withhold(message, (RULE_SIZE,), scanned=False)
            return self._outcome(message, "pass")
        if self.index is None:
            if not message.output_bearing:
                return self._outcome(message, "pass")
            return self._withhold(message, (RULE_NO_INDEX,), scanned=False)
        if oversized:
            return self._withhold(message, (RULE_SIZE,), scanned=True)
        return self._aggregate(message, self.index)

    # -- aggregate ---------------------------------------------------------------------------------------------

    def _aggregate(self, message: _Message, index: FingerprintIndex) -> Outcome:
        """Mime rules, then one leak scan of everything that would leave, then the table checks."""
        shaped = self._shape(message)
        rules = list(shaped.rules)
        buffers = message.buffers if self.rules.allow_comms else []
        if message.buffers and not self.rules.allow_comms:
            rules.append(RULE_BUFFERS)
        content_json = message.content_json if shaped.content is message.content else _canonical(shaped.content)
        blob = [_scannable(message.envelope_json()), _scannable(content_json),
                *_rendered(message.msg_type, shaped.content), *(bytes(buffer) for buffer in buffers)]
        if self._leaks(index, b"\n".join(blob)):
            return self._leaked(message, index, shaped, rules)
        content, table_rules, table_held = self._tables(message, shaped.content)
        rules += table_rules
        held = (*shaped.held, *table_held)
        if content is message.content and len(buffers) == len(message.buffers):
            return self._outcome(message, "pass", held=held)
        return self._outcome(message, "replace", content=content, rules=tuple(rules), held=held, buffers=buffers)

    def _leaks(self, index: FingerprintIndex, data: bytes) -> bool:
        """Whether the policy blocks what the scan finds in `data`."""
        verdict, _ = leak_verdict(index.scan(data), block_rows=self.rules.block_rows,
                                  block_ids=self.rules.block_ids)
        return verdict == "block"

    def _tainted(self, *parts: Any) -> bool:
        """Whether the parts, scanned together, leak (a string is taken as text already serialised)."""
        assert self.index is not None
        return self._leaks(self.index, b"\n".join(_scannable(part if isinstance(part, str) else _canonical(part))
                                                  for part in parts))

    def _leaked(self, message: _Message, index: FingerprintIndex, shaped: _Shaped, rules: list[str]) -> Outcome:
        """The scan found rows: withhold the part that holds them, or the message when that part is its envelope."""
        rules = [*rules, RULE_LEAK]
        if self._leaks(index, _scannable(message.envelope_json())):
            # A header or metadata cannot carry a notice; the client loses this message, not the session.
            return self._outcome(message, "drop", rules=tuple(rules), held=shaped.held, envelope_clean=False)
        notice = withheld_notice([RULE_LEAK])
        content = _withhold_parts(message.msg_type, shaped.content, notice, self._tainted) \
            if message.msg_type == "execute_reply" else None
        if content is None or self._tainted(message.envelope_json(), content):
            content = _notice_content(message.msg_type, shaped.content, notice)
        if content is None or self._tainted(message.envelope_json(), content):
            return self._outcome(message, "drop", rules=tuple(rules), held=shaped.held)
        return self._outcome(message, "replace", content=content, rules=tuple(rules), held=shaped.held)

    def _withhold(self, message: _Message, rules: tuple[str, ...], *, scanned: bool) -> Outcome:
        """The whole output replaced with a notice (or dropped, for a message that cannot carry one)."""
        content = _notice_content(message.msg_type, message.content, withheld_notice(rules))
        if content is None:
            return self._outcome(message, "drop", rules=rules)
        if scanned and self._tainted(message.envelope_json(), content):  # a display_id is kept, and scanned
            return self._outcome(message, "drop", rules=(*rules, RULE_LEAK), envelope_clean=False)
        return self._outcome(message, "replace", content=content, rules=rules)

    def _status(self, message: _Message) -> Outcome:
        """Status drives the client's busy indicator: a tainted one is replaced by a clean one, not dropped."""
        rules: list[str] = []
        if len(message.content_bytes) > self.rules.max_output_bytes:
            rules.append(RULE_SIZE)
        tainted = self.rules.tier == "aggregate" and self.index is not None and self._leaks(
            self.index, _scannable(message.envelope_json()) + b"\n" + _scannable(message.content_json))
        if tainted:
            rules.append(RULE_LEAK)
        if not rules:
            return self._outcome(message, "pass")
        state = message.content.get("execution_state")
        if state not in EXECUTION_STATES:
            return self._outcome(message, "drop", rules=tuple(rules), envelope_clean=not tainted)
        content = {"execution_state": state}
        if not tainted:
            return self._outcome(message, "replace", content=content, rules=tuple(rules))
        date = message.header.get("date")
        header = {"msg_id": uuid.uuid4().hex, "msg_type": "status", "username": "kernel", "session": "",
                  "date": date if isinstance(date, datetime) else datetime.now(UTC), "version": "5.3"}
        parent = {key: value for key, value in message.parent_header.items()
                  if key in ("msg_id", "msg_type", "session", "username", "date", "version")
                  and isinstance(value, str | datetime)}
        if parent and self._tainted(parent):
            parent = {}
        replacement = {**message.msg, "header": header, "parent_header": parent, "metadata": {},
                       "content": content, "buffers": [], "msg_id": header["msg_id"], "msg_type": "status"}
        return self._outcome(message, "replace", rules=tuple(rules), replacement=replacement,
                             envelope_clean=False)

    # -- mime bundles ------------------------------------------------------------------------------------------

    def _shape(self, message: _Message) -> _Shaped:
        """Figures held, unknown mime types removed, in every bundle the message carries."""
        rules: list[str] = []
        held: list[Held] = []

        def shape(holder: dict[str, Any]) -> dict[str, Any]:
            data = _dict(holder.get("data"))
            if data is None:
                return holder
            kept, bundle_rules, bundle_held = self._shape_bundle(message, data)
            if kept is data:
                return holder
            rules.extend(bundle_rules)
            held.extend(bundle_held)
            metadata = _dict(holder.get("metadata")) or {}
            return {**holder, "data": kept, "metadata": {key: value for key, value in metadata.items()
                                                         if key in kept or "/" not in key}}

        content = _map_bundles(message.msg_type, message.content, shape)
        return _Shaped(content, tuple(dict.fromkeys(rules)), tuple(held))

    def _shape_bundle(self, message: _Message, data: dict[str, Any]) -> tuple[dict[str, Any], list[str],
                                                                                     list[Held]]:
        kept: dict[str, Any] = {}
        rules: list[str] = []
        held: list[Held] = []
        for mime, value in data.items():
            if mime in FIGURE_MIMES:
                held.append(Held(self._held_name(message, FIGURE_MIMES[mime]), mime, _figure_bytes(mime, value),
                                 (RULE_FIGURE,)))
                rules.append(RULE_FIGURE)
            elif mime in TEXT_MIMES or (mime == WIDGET_MIME and self.rules.allow_comms):
                kept[mime] = value
            else:
                rules.append(RULE_MIME)
        if not rules:
            return data, [], []
        if held:
            notice = figure_notice()
            kept["text/plain"] = notice + (_text(kept.get("text/plain")) or "")
            if "text/html" in kept:
                kept["text/html"] = f"<pre>{html.escape(notice)}</pre>" + (_text(kept["text/html"]) or "")
            if "text/markdown" in kept:
                kept["text/markdown"] = notice + "\n" + (_text(kept["text/markdown"]) or "")
        elif not kept:
            kept["text/plain"] = withheld_notice([RULE_MIME])
        return kept, rules, held

    def _tables(self, message: _Message, content: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[Held]]:
        """The disclosure checks on every HTML or JSON table: a block withholds the bundle, a review holds it."""
        rules: list[str] = []
        held: list[Held] = []

        def check(holder: dict[str, Any]) -> dict[str, Any]:
            data = _dict(holder.get("data"))
            if data is None:
                return holder
            results, document = self._check_bundle_tables(data)
            blocking = [r.rule for r in results if r.verdict is Verdict.BLOCK]
            review = [r.rule for r in results if r.verdict is Verdict.REVIEW]
            if blocking:
                rules.extend(blocking)
                notice = withheld_notice(blocking)
            elif review and document is not None:
                rules.extend(review)
                mime, body = document
                held.append(Held(self._held_name(message, "html" if mime == "text/html" else "json"), mime, body,
                                 tuple(dict.fromkeys(review))))
                notice = review_notice(review)
            else:
                return holder
            # Every representation goes: the text/plain repr of a DataFrame shows the same cells.
            return {**{key: value for key, value in holder.items() if key not in ("data", "metadata")},
                    "data": {"text/plain": notice}, "metadata": {}}

        checked = _map_bundles(message.msg_type, content, check)
        return checked, list(dict.fromkeys(rules)), held

    def _check_bundle_tables(self, data: dict[str, Any]) -> tuple[list[CheckResult], tuple[str, bytes] | None]:
        """The table checks' results for every table in a bundle, and the document a review would hold."""
        frames: list[tuple[str, pa.Table]] = []
        document: tuple[str, bytes] | None = None
        markup = _text(data.get("text/html"))
        if markup is not None and _TABLE_TAG.search(markup):
            frames += [("output.html", frame) for frame in html_tables(markup)]
            document = ("text/html", markup.encode("utf-8", "surrogatepass"))
        value = data.get("application/json")
        if isinstance(value, list | dict) and value:
            encoded = _canonical(value).encode("utf-8", "surrogatepass")
            table = parse_table("output.json", encoded)
            if table is not None and table.num_columns:
                frames.append(("output.json", table))
                document = document or ("application/json", encoded)
        results: list[CheckResult] = []
        for path, frame in frames:
            if frame.num_rows:
                results += check_table(TableFacts(path=path, frame=frame, provenance=None), sdc=self.rules.sdc,
                                       dataset_parquet=self.dataset_parquet, card=self.card)
        return results, document

    def _held_name(self, message: _Message, extension: str) -> str:
        cell = _SAFE_NAME_CHARS.sub("", str(message.parent_header.get("msg_id") or ""))[:8] or "unknown"
        return f"cell-{cell}-{next(self._held_numbers)}.{extension}"

    # -- outcome -----------------------------------------------------------------------------------------------

    def _outcome(self, message: _Message, action: str, *, content: dict[str, Any] | None = None,
                 rules: tuple[str, ...] = (), held: Iterable[Held] = (), buffers: list[Any] | None = None,
                 replacement: dict[str, Any] | None = None, envelope_clean: bool = True) -> Outcome:
        """The outcome, its replacement message built from `content` unless given, and its audit record."""
        if action == "replace" and replacement is None:
            assert content is not None
            replacement = {**message.msg, "content": content, "buffers": list(buffers or []),
                           "msg_type": message.msg_type}
        rules = tuple(dict.fromkeys(rules))
        audit = None
        if message.output_bearing or rules:
            cell = message.parent_header.get("msg_id")
            audit = {
                "msg_type": message.msg_type if message.msg_type in KNOWN_KERNEL_TYPES else "unknown",
                "channel": message.channel,
                "sha256": hashlib.sha256(message.content_bytes).hexdigest(),
                "size": len(message.content_bytes),
                # A tainted envelope may hold a patient id in place of the cell's id.
                "cell": cell if envelope_clean and isinstance(cell, str) and _SAFE_ID.fullmatch(cell) else None,
                "action": action,
                "rules": list(rules),
            }
        return Outcome(action, replacement if action == "replace" else None, rules, tuple(held), audit)


# -- content rewriting (pure) ------------------------------------------------------------------------------------------


def _map_bundles(msg_type: str, content: dict[str, Any],
                 change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """`content` with `change` applied to every mapping that holds a mime bundle (copied only where it changed)."""
    if msg_type in BUNDLE_TYPES or msg_type == "inspect_reply":
        return change(content)
    if msg_type != "execute_reply":
        return content
    result = content
    expressions = _dict(content.get("user_expressions"))
    if expressions:
        changed = {name: change(value) if isinstance(value, dict) else value for name, value in expressions.items()}
        if any(changed[name] is not expressions[name] for name in expressions):
            result = {**result, "user_expressions": changed}
    payload = content.get("payload")
    if isinstance(payload, list) and payload:
        pages = [change(entry) if isinstance(entry, dict) else entry for entry in payload]
        if any(new is not old for new, old in zip(pages, payload, strict=True)):
            result = {**result, "payload": pages}
    return result


def _bundles(msg_type: str, content: dict[str, Any]) -> Iterator[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def collect(holder: dict[str, Any]) -> dict[str, Any]:
        data = _dict(holder.get("data"))
        if data is not None:
            found.append(data)
        return holder

    _map_bundles(msg_type, content, collect)
    return iter(found)


def _rendered(msg_type: str, content: dict[str, Any]) -> list[bytes]:
    """Markup as the browser shows it, where inline tags or entities could split a value for the raw scan."""
    extra = []
    for data in _bundles(msg_type, content):
        for mime in MARKUP_MIMES:
            text = _text(data.get(mime))
            if text is not None and _needs_rendering(text):
                extra.append(_scannable(html.unescape(_INLINE_MARKUP.sub("", text))))
    return extra


def _figure_bytes(mime: str, value: Any) -> bytes:
    text = _text(value)
    if text is None:
        return _canonical(value).encode()
    if mime in BASE64_MIMES:
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            pass
    return text.encode("utf-8", "surrogatepass")


def _withheld_expression(notice: str) -> dict[str, Any]:
    return {"status": "error", "ename": "OutputWithheld", "evalue": notice, "traceback": []}


def _withhold_parts(msg_type: str, content: dict[str, Any], notice: str,
                    tainted: Callable[..., bool]) -> dict[str, Any] | None:
    """An execute_reply with only its tainted expressions, payload pages and error withheld."""
    result = dict(content)
    if any(key in content for key in ("ename", "evalue", "traceback")) and tainted(
            {key: content.get(key) for key in ("ename", "evalue", "traceback")}):
        result.update(ename="OutputWithheld", evalue=notice, traceback=[notice])
    expressions = _dict(content.get("user_expressions"))
    if expressions:
        result["user_expressions"] = {name: _withheld_expression(notice) if tainted(name, value) else value
                                      for name, value in expressions.items()}
    payload = content.get("payload")
    if isinstance(payload, list):
        result["payload"] = [entry for entry in payload if not tainted(entry)]
    return result


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
    if msg_type == "input_request":  # the kernel still waits for an answer, so the prompt must arrive
        return {"prompt": notice, "password": bool(content.get("password"))}
    if msg_type == "execute_input":
        return {"code": "# " + notice, "execution_count": _integer(content.get("execution_count"))}
    return None
