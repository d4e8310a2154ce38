"""What each file's checks add up to, tier by tier: released, in review, or blocked. Pure.

The rule is an allow-list. In the `aggregate` tier the buyer's own bytes never leave without a
person, whatever the scanners say: a scanner that looks for rows cannot be complete, since any
encoding defeats it. Only what the platform made and verified itself (verified tables, DP results)
is released automatically; the leak scan stays to point reviewers at risk. `trusted` sends every
file to review. `dp_only` code never saw a real row (it runs on the published DP mock), so files
whose content checks pass may release there as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from sandbox.egress.baseline import detect_kind
from sandbox.egress.models import model_risk_checks
from sandbox.egress.verdicts import SEVERITY, CheckResult, OutputFacts, OutputKind, Verdict
from sandbox.release.status import OutputStatus

# Output names a buyer's code may use: plain path segments, nothing that hides or escapes.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99}){0,7}$")
# Folders the platform writes into; a job's own file there would pass for the platform's.
RESERVED_FOLDERS = frozenset({"logs", "tables", "dp", ".tables"})
LOG_PATHS = ("logs/stdout.txt", "logs/stderr.txt")
STATUS_OF = {Verdict.BLOCK: OutputStatus.BLOCKED, Verdict.REVIEW: OutputStatus.IN_REVIEW,
             Verdict.PASS: OutputStatus.RELEASED}


@dataclass(frozen=True)
class OutputDecision:
    path: str
    kind: OutputKind
    verdict: Verdict
    status: OutputStatus
    checks: list[CheckResult] = field(default_factory=list)


def name_problem(path: str) -> CheckResult | None:
    """Why a buyer's file name cannot stand as an output name, or None."""
    if not SAFE_NAME.fullmatch(path):
        return CheckResult("unsafe-name", Verdict.BLOCK,
                           "output names are letters, digits, '.', '_' and '-' in at most 8 folders of 100 "
                           "characters; this one is not")
    if PurePosixPath(path).parts[0] in RESERVED_FOLDERS:
        return CheckResult("reserved-path", Verdict.BLOCK,
                           f"{PurePosixPath(path).parts[0]}/ is where the platform writes its own files")
    return None


def logs_release(policy: dict[str, Any]) -> str:
    return str(policy["egress"].get("logs", {}).get("release", "review"))


def route_outputs(outputs: list[OutputFacts], *, policy: dict[str, Any], tier: str,
                  content: dict[str, list[CheckResult] | None] | None = None,
                  names: CheckResult | None = None) -> list[OutputDecision]:
    """Verdict and release status for every file the job or its logs produced, in the order given.

    `content` holds, per path, what the disclosure checks found (None: no check covers that file);
    `names` is the leak scan of all the job's output names together.
    """
    egress = policy["egress"]
    max_file = int(float(egress["max_file_mb"]) * 1024 * 1024)
    max_total = int(float(egress["max_total_mb"]) * 1024 * 1024)
    allowed = set(egress["allowed_kinds"])
    auto_release = bool(policy["review"]["auto_release"]) and tier != "trusted"
    decisions = []
    total = 0
    for facts in outputs:
        checks: list[CheckResult] = []
        if not facts.is_log:
            problem = name_problem(facts.path)
            if problem is not None:
                checks.append(problem)
            if names is not None:
                checks.append(names)
        if facts.refused_reason is not None:
            checks.append(CheckResult("file-type", Verdict.BLOCK, facts.refused_reason))
            decisions.append(OutputDecision(facts.path, OutputKind.UNKNOWN, Verdict.BLOCK, OutputStatus.BLOCKED,
                                            checks))
            continue
        kind, found_kind = detect_kind(facts)
        checks.extend(found_kind)
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
        found = (content or {}).get(facts.path)
        checks.extend(_kind_rules(kind, facts, egress, tier=tier, found=found))
        if found is not None:
            checks.extend(found)
        checks.extend(_tier_rules(facts, found, tier, policy, checks, auto_release=auto_release))
        verdict = max((c.verdict for c in checks), key=SEVERITY.__getitem__, default=Verdict.PASS)
        decisions.append(OutputDecision(facts.path, kind, verdict, STATUS_OF[verdict], checks))
    return quarantine_after_leaks(decisions)


def _kind_rules(kind: OutputKind, facts: OutputFacts, egress: dict[str, Any], *, tier: str,
                found: list[CheckResult] | None) -> list[CheckResult]:
    checks = []
    if kind is OutputKind.MODEL and tier == "dp_only":
        # The model the platform trains with DP-SGD leaves as the platform's own output, never through here.
        checks.append(CheckResult("dp-only-model", Verdict.BLOCK,
                                  "a dp_only contract releases only models the platform trained with DP "
                                  "(kind dp_training); a model the job's own code trained never leaves"))
    if kind is OutputKind.MODEL:
        release = egress["models"]["release"]
        suffix = PurePosixPath(facts.path).suffix.lstrip(".").lower()
        if suffix not in egress["models"]["formats"]:
            checks.append(CheckResult("model-format", Verdict.BLOCK, f"policy does not allow {suffix} models"))
        checks.append(CheckResult("model-release", Verdict.BLOCK if release == "block" else Verdict.REVIEW,
                                  "models leave only after review" if release == "review" else
                                  "policy does not let models leave"))
        if not any(c.rule == "membership-inference" for c in found or []):
            checks.extend(model_risk_checks(facts))
    if kind is OutputKind.FIGURE:
        release = egress["figures"]["release"]
        checks.append(CheckResult("figure-release", Verdict.BLOCK if release == "block" else Verdict.REVIEW,
                                  "figures leave only after review" if release == "review" else
                                  "policy does not let figures leave"))
    return checks


def _tier_rules(facts: OutputFacts, found: list[CheckResult] | None, tier: str, policy: dict[str, Any],
                checks: list[CheckResult], *, auto_release: bool) -> list[CheckResult]:
    """The review a file needs on top of its checks: the allow-list of what may leave unreviewed."""
    verdict = max((c.verdict for c in checks), key=SEVERITY.__getitem__, default=Verdict.PASS)
    if verdict is not Verdict.PASS:
        return []
    if not auto_release:
        return [CheckResult("policy-review", Verdict.REVIEW,
                            "the policy (or the trusted tier) sends every output to review")]
    if found is None:
        return [CheckResult("content-review", Verdict.REVIEW,
                            "no automatic disclosure check covers this content; a steward reviews it")]
    if tier != "aggregate":
        return []
    if facts.is_log:
        if facts.size == 0:
            return [CheckResult("logs", Verdict.PASS, "the job printed nothing here")]
        if logs_release(policy) == "if_clean":
            return [CheckResult("logs", Verdict.PASS,
                                "the policy releases logs in which the leak scan finds nothing (logs: if_clean)")]
        return [CheckResult("logs", Verdict.REVIEW,
                            "logs are text the job wrote from the rows; the policy has a steward read them first "
                            "(logs: review)")]
    return [CheckResult("unverified-content", Verdict.REVIEW,
                        "the job's own bytes: in the aggregate tier only tables the platform recomputed and wrote "
                        "(sandbox_client.tables) and DP results leave without a person")]


def quarantine_after_leaks(decisions: list[OutputDecision]) -> list[OutputDecision]:
    """A job caught leaking rows in one file releases nothing by itself: a person looks at the rest."""
    leaked = [d.path for d in decisions
              if any(c.rule in ("leak-scan", "name-scan") and c.verdict is Verdict.BLOCK for c in d.checks)]
    if not leaked:
        return decisions
    held = CheckResult("leak-quarantine", Verdict.REVIEW,
                       f"the same job leaked dataset rows in {', '.join(leaked[:3])}; nothing leaves unreviewed")
    return [OutputDecision(d.path, d.kind, Verdict.REVIEW, OutputStatus.IN_REVIEW, [*d.checks, held])
            if d.status is OutputStatus.RELEASED else d for d in decisions]
