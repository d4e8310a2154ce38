"""Baseline egress: a file's kind by extension and content, verified against its magic bytes.

What the checks add up to, tier by tier, is `sandbox.release.routing`'s.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

# Re-exported: checks written against this module keep working.
from sandbox.egress.verdicts import SEVERITY as SEVERITY
from sandbox.egress.verdicts import CheckResult as CheckResult
from sandbox.egress.verdicts import OutputFacts as OutputFacts
from sandbox.egress.verdicts import OutputKind as OutputKind
from sandbox.egress.verdicts import Verdict as Verdict

EXTENSION_KINDS: dict[str, OutputKind] = {
    ".csv": OutputKind.TABLE, ".tsv": OutputKind.TABLE, ".parquet": OutputKind.TABLE, ".json": OutputKind.TABLE,
    ".xlsx": OutputKind.TABLE,
    ".png": OutputKind.FIGURE, ".pdf": OutputKind.FIGURE, ".svg": OutputKind.FIGURE, ".jpg": OutputKind.FIGURE,
    ".jpeg": OutputKind.FIGURE,
    ".txt": OutputKind.TEXT, ".md": OutputKind.TEXT, ".log": OutputKind.TEXT,
    ".safetensors": OutputKind.MODEL, ".onnx": OutputKind.MODEL, ".skops": OutputKind.MODEL,
    ".py": OutputKind.CODE, ".ipynb": OutputKind.CODE, ".r": OutputKind.CODE, ".sql": OutputKind.CODE,
}
TEXT_EXTENSIONS = {".csv", ".tsv", ".json", ".txt", ".md", ".log", ".py", ".ipynb", ".r", ".sql", ".svg"}
PICKLE_EXTENSIONS = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".bin", ".npy", ".npz", ".h5", ".keras"}


def sniff(head: bytes) -> str | None:
    """A content type from magic bytes, or None for plain data."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # Pickle protocol 2+ starts with PROTO; torch.save writes a zip holding data.pkl.
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if head.startswith(b"\x89HDF"):
        return "hdf5"
    return None


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the head is still text.
        return exc.start >= len(head) - 3
    return True


def detect_kind(facts: OutputFacts) -> tuple[OutputKind, list[CheckResult]]:
    """The kind by extension, verified against content; mismatches block."""
    if facts.is_log:
        return OutputKind.LOG, [CheckResult("kind", Verdict.PASS, "job log")]
    suffix = PurePosixPath(facts.path).suffix.lower()
    content = sniff(facts.head)
    if content == "pickle" or suffix in PICKLE_EXTENSIONS or (content == "zip" and b"data.pkl" in facts.head):
        return OutputKind.UNKNOWN, [CheckResult(
            "safe-format", Verdict.BLOCK,
            "pickle-based files (pickle, joblib, torch.save, numpy object arrays) can run code when loaded "
            "and hide arbitrary data; export models as safetensors, ONNX or skops instead")]
    kind = EXTENSION_KINDS.get(suffix, OutputKind.UNKNOWN)
    if kind is OutputKind.UNKNOWN:
        return kind, [CheckResult("kind", Verdict.BLOCK, f"files of type {suffix or '(none)'!r} may not leave")]
    expected = {".png": "png", ".pdf": "pdf", ".jpg": "jpeg", ".jpeg": "jpeg", ".parquet": "parquet",
                ".xlsx": "zip"}.get(suffix)
    if expected and content != expected:
        return kind, [CheckResult("kind", Verdict.BLOCK, f"named {suffix} but the content is not {expected}")]
    if suffix in TEXT_EXTENSIONS and not _is_text(facts.head):
        return kind, [CheckResult("kind", Verdict.BLOCK, f"named {suffix} but the content is not UTF-8 text")]
    if suffix == ".safetensors" and not _safetensors_header_ok(facts.head):
        return kind, [CheckResult("kind", Verdict.BLOCK, "not a valid safetensors file")]
    if suffix == ".skops" and content != "zip":
        # Only a zip here: its schema.json may lie past the head. The membership-inference gate opens the
        # whole archive (untrusted types refused) where training rows are known; elsewhere a steward reviews.
        return kind, [CheckResult("kind", Verdict.BLOCK, "not a skops archive (a zip)")]
    if suffix == ".svg":
        active = svg_active_content(facts.head)
        if active:
            return kind, [CheckResult("svg-active-content", Verdict.BLOCK,
                                      f"SVG with {active} can run code or fetch from elsewhere when opened")]
    results = [CheckResult("kind", Verdict.PASS, f"{kind.value} ({suffix})")]
    if facts.declared_kind and facts.declared_kind != kind.value:
        results.append(CheckResult("declared-kind", Verdict.REVIEW,
                                   f"manifest.json declares {facts.declared_kind!r}, content says {kind.value!r}"))
    return kind, results


_SVG_ACTIVE = [
    (re.compile(rb"<\s*script", re.IGNORECASE), "a script"),
    (re.compile(rb"\son[a-z]+\s*=", re.IGNORECASE), "an event handler"),
    (re.compile(rb"<\s*foreignObject", re.IGNORECASE), "a foreignObject"),
    (re.compile(rb"<!ENTITY", re.IGNORECASE), "an XML entity"),
    (re.compile(rb"(?:xlink:)?href\s*=\s*[\"']\s*(?!#)", re.IGNORECASE), "an external reference"),
    (re.compile(rb"url\(\s*[\"']?\s*(?!#)", re.IGNORECASE), "an external url()"),
    (re.compile(rb"javascript:", re.IGNORECASE), "a javascript: URL"),
]


def svg_active_content(data: bytes) -> str | None:
    """What in an SVG could run or reach out: scripts, handlers, external references. None if clean."""
    for pattern, what in _SVG_ACTIVE:
        if pattern.search(data):
            return what
    return None


def _safetensors_header_ok(head: bytes) -> bool:
    if len(head) < 10:
        return False
    length = int.from_bytes(head[:8], "little")
    if length <= 0 or length > 100_000_000:
        return False
    header = head[8:8 + length]
    if len(header) < length:
        return header.lstrip().startswith(b"{")
    try:
        return isinstance(json.loads(header), dict)
    except ValueError:
        return False
