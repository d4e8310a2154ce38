"""The checks every new version passes before use: its de-identification report and what the policy decides.

A version is read and typed by `ingest`, then `assess` scans it for direct identifiers (`deid`) and measures
the k-anonymity of the card's quasi-identifiers (`kanon`). The policy named by the card's
`registration_policy` decides: a finding either blocks the version until the steward remediates it
(`block`), or blocks it until a steward signs an override naming the reason (`override`). The report is
kept with the version; `summary` is what the catalog shows of it.

Remediation is the report's own advice turned into a new card (`remediated_card`): columns dropped at
reading, quasi-identifiers generalised at ingest. Every later weekly version gets the same treatment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sandbox.auth.keys import canonical
from sandbox.catalog.cards import DatasetCard, Generalisation, card_errors
from sandbox.catalog.deid import finding_json, scan_identifiers
from sandbox.catalog.kanon import k_anonymity
from sandbox.errors import Conflict, Invalid

Decision = Literal["block", "override"]


@dataclass(frozen=True)
class RegistrationRules:
    """A policy's `registration` section, with the defaults a policy without one gets."""

    policy: str  # name@version, recorded in the report
    identifiers: Decision = "override"
    low_k: Decision = "override"
    min_k: int = 5
    min_l: int = 1
    # A collection's file headers failing the PS3.15 Basic Profile (`sandbox.catalog.dicom_deid`), or
    # carrying identifying text in PNG, JPEG or NIfTI headers (`sandbox.catalog.file_headers`).
    dicom: Decision = "override"

    @classmethod
    def from_policy(cls, reference: str, body: dict[str, Any]) -> RegistrationRules:
        section = body.get("registration") or {}
        return cls(policy=reference, identifiers=section.get("identifiers", "override"),
                   low_k=section.get("low_k", "override"), min_k=int(section.get("min_k", 5)),
                   min_l=int(section.get("min_l", 1)), dicom=section.get("dicom", "override"))


def assess(parquet: Path, card: DatasetCard, rules: RegistrationRules, *, threads: int = 2) -> dict[str, Any]:
    """The de-identification report of a stored (typed) version: what was found, and whether it blocks."""
    findings = scan_identifiers(parquet, card, threads=threads)
    identifiers = [finding_json(f) for f in findings]
    anonymity = k_anonymity(parquet, card, min_k=rules.min_k, threads=threads)
    reasons = []
    flagged = sorted({f.column for f in findings})
    if findings:
        kinds = ", ".join(sorted({f"{f.column} ({f.kind})" for f in findings}))
        reasons.append({"check": "identifiers", "overridable": rules.identifiers == "override",
                        "detail": f"direct identifiers found in {kinds}"})
    k = anonymity.get("k")
    if k is not None and k < rules.min_k:
        reasons.append({"check": "k_anonymity", "overridable": rules.low_k == "override",
                        "detail": f"k={k} over {', '.join(card.quasi_identifiers)}: "
                                  f"{anonymity.get('rare_classes', 0)} combination(s) hold fewer than "
                                  f"{rules.min_k} patients (the policy's min_k)"})
    for column, diversity in sorted((anonymity.get("l_diversity") or {}).items()):
        if diversity < rules.min_l:
            reasons.append({"check": "l_diversity", "overridable": rules.low_k == "override",
                            "detail": f"l={diversity} for {column}: a combination of quasi-identifiers shows "
                                      f"fewer than {rules.min_l} distinct values (the policy's min_l)"})
    return {
        "blocked": bool(reasons),
        "reasons": reasons,
        "identifiers": identifiers,
        "flagged_columns": flagged,
        "k_anonymity": anonymity,
        "policy": rules.policy,
        "rules": {"identifiers": rules.identifiers, "low_k": rules.low_k, "min_k": rules.min_k,
                  "min_l": rules.min_l},
        "checked_at": datetime.now(UTC).isoformat(),
    }


def with_dicom(report: dict[str, Any], dicom: dict[str, Any] | None, rules: RegistrationRules) -> dict[str, Any]:
    """A collection's report: the tabular one over its manifest, with the file header report beside it
    (`report["dicom"]`) and a `dicom` reason when any file's header failed the profile or embeds identifying
    text (PNG, JPEG and NIfTI headers, `sandbox.catalog.file_headers`)."""
    if dicom is None:
        return report
    reasons = list(report["reasons"])
    if dicom.get("classes"):
        reasons.append({"check": "dicom", "overridable": rules.dicom == "override",
                        "detail": f"{dicom['flagged_files']} of {dicom['files']} file(s) carry identifying headers "
                                  f"(the PS3.15 Basic Profile's classes, or text a PNG, JPEG or NIfTI header "
                                  f"embeds): {', '.join(dicom['classes'])}"})
    return {**report, "blocked": bool(reasons), "reasons": reasons, "dicom": dicom,
            "rules": {**report["rules"], "dicom": rules.dicom}}


def report_sha256(report: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(report)).hexdigest()


def summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the catalog shows of a report: k, the flagged columns, and whether an override let it through."""
    if report is None:
        return None
    anonymity = report.get("k_anonymity") or {}
    return {"k": anonymity.get("k"), "quasi_identifiers": anonymity.get("quasi_identifiers", []),
            "l_diversity": anonymity.get("l_diversity", {}), "flagged_columns": report.get("flagged_columns", []),
            "blocked": report.get("blocked", False), "overridden": report.get("override") is not None}


def check_overridable(report: dict[str, Any]) -> None:
    """Refuse an override the policy does not allow: it names each finding that must be fixed instead."""
    if not report.get("blocked"):
        raise Conflict("the version is not blocked: there is nothing to override")
    fixed_only = [reason["detail"] for reason in report.get("reasons", []) if not reason.get("overridable")]
    if fixed_only:
        raise Conflict(f"policy {report.get('policy')} allows no override of: {'; '.join(fixed_only)}; "
                       f"remediate the version instead")


class Remediation(BaseModel):
    """A steward's fix of a blocked version: columns to drop, generalisations, the report's suggestions."""

    model_config = ConfigDict(extra="forbid")

    drop: list[str] = Field(default_factory=list, max_length=2000)
    generalise: dict[str, Generalisation] = Field(default_factory=dict, max_length=50)
    accept: list[str] = Field(default_factory=list, max_length=50)


def remediated_card(card: DatasetCard, report: dict[str, Any], *, drop: list[str],
                    generalise: dict[str, Generalisation], accept: list[str]) -> DatasetCard:
    """The card with `drop` moved to `drop_columns` (out of columns, quasi-identifiers and sensitive
    columns) and the generalisations of `generalise` and of the report's accepted suggestions merged."""
    if not (drop or generalise or accept):
        raise Invalid("a remediation names columns to drop, generalisations, or suggestions to accept")
    rules = dict(card.generalise)
    suggestions = {s["id"]: s for s in (report.get("k_anonymity") or {}).get("suggestions", [])}
    for suggestion_id in accept:
        if suggestion_id not in suggestions:
            raise Invalid(f"the report has no suggestion {suggestion_id!r}",
                          [f"suggestions: {', '.join(sorted(suggestions)) or 'none'}"])
        for column, rule in suggestions[suggestion_id]["generalise"].items():
            rules[column] = Generalisation.model_validate(rule)
    rules.update(generalise)
    unknown = [column for column in drop if column not in card.columns]
    if unknown:
        raise Invalid("drop names columns the card does not declare", [f"column {c!r}" for c in unknown])
    if card.privacy_unit in drop:
        raise Invalid(f"the privacy unit {card.privacy_unit!r} cannot be dropped")
    body = card.model_dump(mode="json")
    body["columns"] = {name: spec for name, spec in body["columns"].items() if name not in drop}
    body["drop_columns"] = sorted(set(card.drop_columns) | set(drop))
    body["quasi_identifiers"] = [c for c in card.quasi_identifiers if c not in drop]
    body["sensitive_columns"] = [c for c in card.sensitive_columns if c not in drop]
    body["marginal_pairs"] = [pair for pair in body["marginal_pairs"] if not set(pair) & set(drop)]
    body["generalise"] = {column: rule.model_dump(mode="json", exclude_none=True)
                          for column, rule in rules.items() if column not in drop}
    remediated = DatasetCard.model_validate(body)
    errors = card_errors(remediated)
    if errors:
        raise Invalid("the remediated card is invalid", errors)
    return remediated
