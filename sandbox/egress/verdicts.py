"""The vocabulary of egress checks: what a check is told about a file, and what it answers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    PASS = "pass"
    REVIEW = "review"
    BLOCK = "block"


SEVERITY = {Verdict.PASS: 0, Verdict.REVIEW: 1, Verdict.BLOCK: 2}


class OutputKind(StrEnum):
    TABLE = "table"
    FIGURE = "figure"
    TEXT = "text"
    MODEL = "model"
    DP_RESULT = "dp_result"
    CODE = "code"
    LOG = "log"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class OutputFacts:
    """What the worker knows about one file, without the checks touching the disk."""

    path: str
    size: int
    head: bytes  # the first few KiB
    declared_kind: str | None = None  # from /output/manifest.json, a claim to verify
    is_log: bool = False
    refused_reason: str | None = None  # the runner did not copy it (symlink, device...)


@dataclass(frozen=True)
class CheckResult:
    rule: str
    verdict: Verdict
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "verdict": self.verdict.value, "reason": self.reason}
