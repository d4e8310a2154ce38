"""Baseline egress: kind by extension and content, sizes, special files, and routing by policy.

This is the baseline pipeline (kind, content, size, file type, policy routing). Disclosure checks
on the content itself (cell counts, dominance, leak scans) plug in as further checks; until a
kind has such a content check, policy's auto-release does not apply to it and it goes to review:
an unchecked free-text log could carry patient rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from sandbox.egress.models import model_risk_checks

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


@dataclass(frozen=True)
class OutputDecision:
    path: str
    kind: OutputKind
    verdict: Verdict
    status: str  # released | in_review | blocked
    checks: list[CheckResult] = field(default_factory=list)


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
    if suffix == ".skops" and not (content == "zip" and b"schema.json" in facts.head):
        return kind, [CheckResult("kind", Verdict.BLOCK, "not a skops archive (a zip holding schema.json)")]
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


def decide_outputs(outputs: list[OutputFacts], *, policy: dict[str, Any], tier: str,
                   content: dict[str, list[CheckResult] | None] | None = None) -> list[OutputDecision]:
    """Verdict and release status for every file of one job, in the order given.

    `content` holds, per path, what the disclosure checks found (None: no check covers that file).
    Only a file whose content was checked, or that is empty, may release without a person.
    """
    egress = policy["egress"]
    max_file = int(float(egress["max_file_mb"]) * 1024 * 1024)
    max_total = int(float(egress["max_total_mb"]) * 1024 * 1024)
    allowed = set(egress["allowed_kinds"])
    auto_release = bool(policy["review"]["auto_release"]) and tier != "trusted"
    decisions = []
    total = 0
    for facts in outputs:
        if facts.refused_reason is not None:
            check = CheckResult("file-type", Verdict.BLOCK, facts.refused_reason)
            decisions.append(OutputDecision(facts.path, OutputKind.UNKNOWN, Verdict.BLOCK, "blocked", [check]))
            continue
        kind, checks = detect_kind(facts)
        if kind.value not in allowed and kind is not OutputKind.UNKNOWN:
            checks.append(CheckResult("allowed-kinds", Verdict.BLOCK, f"policy does not let {kind.value} files leave"))
        if facts.size > max_file:
            checks.append(CheckResult("size", Verdict.BLOCK,
                                      f"{facts.size} bytes is over the policy's {egress['max_file_mb']} MB per file"))
        else:
            total += facts.size
            if total > max_total:
                checks.append(CheckResult("total-size", Verdict.BLOCK,
                                          f"the job's outputs pass the policy's {egress['max_total_mb']} MB in all"))
        if kind is OutputKind.MODEL:
            release = egress["models"]["release"]
            suffix = PurePosixPath(facts.path).suffix.lstrip(".").lower()
            if suffix not in egress["models"]["formats"]:
                checks.append(CheckResult("model-format", Verdict.BLOCK, f"policy does not allow {suffix} models"))
            checks.append(CheckResult("model-release", Verdict.BLOCK if release == "block" else Verdict.REVIEW,
                                      "models leave only after review" if release == "review" else
                                      "policy does not let models leave"))
            checks.extend(model_risk_checks(facts))
        if kind is OutputKind.FIGURE:
            release = egress["figures"]["release"]
            checks.append(CheckResult("figure-release", Verdict.BLOCK if release == "block" else Verdict.REVIEW,
                                      "figures leave only after review" if release == "review" else
                                      "policy does not let figures leave"))
        found = (content or {}).get(facts.path)
        if found is not None:
            checks.extend(found)
        verdict = max((c.verdict for c in checks), key=SEVERITY.__getitem__, default=Verdict.PASS)
        if verdict is Verdict.PASS and facts.size == 0:
            checks.append(CheckResult("content", Verdict.PASS, "empty: nothing to disclose"))
        elif verdict is Verdict.PASS and found is None:
            checks.append(CheckResult("content-review", Verdict.REVIEW,
                                      "no automatic disclosure check covers this content yet; a steward reviews it"))
            verdict = Verdict.REVIEW
        if verdict is Verdict.PASS and not auto_release:
            checks.append(CheckResult("policy-review", Verdict.REVIEW,
                                      "the policy (or the trusted tier) sends every output to review"))
            verdict = Verdict.REVIEW
        status = {Verdict.BLOCK: "blocked", Verdict.REVIEW: "in_review", Verdict.PASS: "released"}[verdict]
        decisions.append(OutputDecision(facts.path, kind, verdict, status, checks))
    return quarantine_after_leaks(decisions)


def quarantine_after_leaks(decisions: list[OutputDecision]) -> list[OutputDecision]:
    """A job caught leaking rows in one file releases nothing by itself: a person looks at the rest."""
    leaked = [d.path for d in decisions
              if any(c.rule == "leak-scan" and c.verdict is Verdict.BLOCK for c in d.checks)]
    if not leaked:
        return decisions
    held = CheckResult("leak-quarantine", Verdict.REVIEW,
                       f"the same job leaked dataset rows in {', '.join(leaked[:3])}; nothing leaves unreviewed")
    return [OutputDecision(d.path, d.kind, Verdict.REVIEW, "in_review", [*d.checks, held])
            if d.status == "released" else d for d in decisions]
