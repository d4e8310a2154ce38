"""Disclosure checks on what a file says: the leak scan for every text-like output, and
statistical disclosure control for tables. The worker runs them; the baseline routes the result.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.egress.leaks import FingerprintIndex, leak_verdict
from sandbox.egress.tables import TableFacts, check_table, parse_table
from sandbox.egress.verdicts import CheckResult, OutputFacts, OutputKind, Verdict

# Kinds whose content these checks cover; only such files may release without a person.
SCANNED_KINDS = frozenset({OutputKind.TABLE, OutputKind.TEXT, OutputKind.LOG, OutputKind.CODE})


@dataclass(frozen=True)
class ContentContext:
    """What the checks compare outputs with: the version's fingerprints, its rows, its card, the policy."""

    index: FingerprintIndex | None
    dataset_parquet: Path | None
    card: dict[str, Any] | None
    policy: dict[str, Any]


def content_checks(facts: OutputFacts, kind: OutputKind, data: bytes, context: ContentContext,
                   provenance: dict[str, Any] | None = None) -> list[CheckResult] | None:
    """The content checks' results, or None when no content check covers this file."""
    if kind not in SCANNED_KINDS or context.index is None:
        return None
    leak_scan = context.policy["egress"]["leak_scan"]
    report = context.index.scan(data)
    verdict, reason = leak_verdict(report, block_rows=int(leak_scan["block_rows"]),
                                   block_ids=int(leak_scan["block_ids"]))
    results = [CheckResult("leak-scan", Verdict.BLOCK if verdict == "block" else Verdict.PASS, reason)]
    if kind is OutputKind.TABLE:
        table = parse_table(facts.path, data)
        if table is None:
            results.append(CheckResult("table-format", Verdict.REVIEW, "could not be read as a table"))
        else:
            results += check_table(TableFacts(path=facts.path, frame=table, provenance=provenance),
                                   sdc=context.policy["egress"]["sdc"], dataset_parquet=context.dataset_parquet,
                                   card=context.card)
    return results


def sidecar(files: dict[str, bytes], path: str) -> dict[str, Any] | None:
    """The provenance the in-image table helper wrote beside `path` (a claim the table checks verify)."""
    raw = files.get(f"{path}.sdc.json")
    if raw is None:
        return None
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) else None


def fingerprint_path(artifacts: Path, dataset: str, version: int) -> Path:
    """Where a version's fingerprint index lives: beside the version (hashes only, no values)."""
    return artifacts / "datasets" / dataset / f"v{version}.fingerprints"


def ensure_fingerprints(artifacts: Path, dataset: str, version: int, parquet: Path,
                        card: dict[str, Any]) -> FingerprintIndex:
    """The version's index, built on first need (normally right after the version is registered), and
    rebuilt once when it predates the current format (an older index misses partial rows)."""
    path = fingerprint_path(artifacts, dataset, version)
    if path.exists():
        index = FingerprintIndex.load(path)
        if not index.outdated:
            return index
    # Built aside and renamed: a reader never sees half an index, and two builders cannot mix.
    staged = path.with_name(f".{uuid.uuid4().hex}.fingerprints")
    try:
        FingerprintIndex.build(parquet, card, staged)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return FingerprintIndex.load(path)
