"""The release pipeline's steps for a finished job: split what the job wrote from what it asked the
platform to make, make the verified tables, and store them beside the job's own files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy.orm import Session

from runners.base import Collected, CollectedFile
from sandbox.egress.verdicts import CheckResult, Verdict
from sandbox.release.dp_answers import job_answers
from sandbox.release.status import Origin, OutputStatus
from sandbox.release.tables import (
    FORMATS,
    SPEC_FOLDER,
    EarlierRelease,
    SpecError,
    VerifiedTable,
    parse_spec,
    platform_dir,
    store_platform_output,
    verify_table,
)
from sandbox.store.models import Job, JobOutput

MAX_SPEC_BYTES = 64 * 1024


@dataclass(frozen=True)
class TableRequest:
    """One specification the job left in /output/.tables: the table the platform made, or why it made none."""

    verified: VerifiedTable | None
    fmt: str
    refusal: str | None = None


@dataclass(frozen=True)
class Checked:
    """What the content checks found, computed outside any store transaction."""

    content: dict[str, list[CheckResult] | None]
    names: CheckResult | None
    tables: list[TableRequest]


def spec_files(collected: Collected) -> list[CollectedFile]:
    return [f for f in collected.files if PurePosixPath(f.path).parts[0] == SPEC_FOLDER]


def buyer_files(collected: Collected) -> list[CollectedFile]:
    """The files the job wrote as outputs: everything but its table specifications."""
    return [f for f in collected.files if PurePosixPath(f.path).parts[0] != SPEC_FOLDER]


def withheld_name(path: str) -> str:
    """A neutral stand-in for a name that cannot be listed as it is."""
    return f"withheld/{hashlib.sha256(path.encode(errors='surrogateescape')).hexdigest()[:16]}"


def verified_tables(files: list[CollectedFile], *, tier: str, policy: dict[str, Any], card: dict[str, Any],
                    parquet: Path, earlier: list[EarlierRelease]) -> list[TableRequest]:
    """Recompute and check every table the job specified, each against the buyer's earlier releases and the
    tables before it in this job."""
    if not files:
        return []
    if tier == "dp_only":
        return [TableRequest(None, "csv", "verified tables are recomputed from real rows, which a dp_only contract "
                                          "never sees; use DP queries")]
    cap = int(policy["egress"].get("verified_tables", {}).get("max_per_job", 50))
    requests = []
    seen = list(earlier)
    for number, file in enumerate(sorted(files, key=lambda f: f.path)):
        if number >= cap:
            requests.append(TableRequest(None, "csv", f"the policy makes at most {cap} verified tables per job"))
            break
        try:
            raw = _read_spec(file)
            fmt = raw.pop("format", "csv")
            if fmt not in FORMATS:
                raise SpecError(f"tables are written as {', '.join(FORMATS)}")
            spec = parse_spec(raw, card)
            verified = verify_table(spec, dataset_parquet=parquet, card=card, sdc=policy["egress"]["sdc"],
                                    earlier=seen)
        except SpecError as exc:
            requests.append(TableRequest(None, "csv", str(exc)))
            continue
        if verified.verdict is Verdict.PASS:
            seen.append(EarlierRelease(spec=spec, dataset_parquet=parquet, where="this job"))
        requests.append(TableRequest(verified, fmt))
    return requests


def _read_spec(file: CollectedFile) -> dict[str, Any]:
    if file.size > MAX_SPEC_BYTES:
        raise SpecError(f"a table specification is at most {MAX_SPEC_BYTES} bytes")
    try:
        raw = json.loads(file.stored_at.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError("a table specification is a JSON object") from exc
    if not isinstance(raw, dict):
        raise SpecError("a table specification is a JSON object")
    return raw


def store_verified_tables(session: Session, job: Job, requests: list[TableRequest], *, policy: dict[str, Any],
                          held: bool, artifacts: Path) -> list[JobOutput]:
    """The platform's files for the job's tables, released when they pass and nothing holds the job."""
    auto_release = bool(policy["review"]["auto_release"]) and job.tier != "trusted"
    stored = []
    for number, request in enumerate(requests, start=1):
        if request.verified is None:
            stored.append(_refusal(session, job, number, request.refusal or "no table was made"))
            continue
        verified = request.verified
        if verified.verdict is Verdict.PASS and not auto_release:
            verified = dataclasses.replace(verified, checks=[*verified.checks, CheckResult(
                "policy-review", Verdict.REVIEW, "the policy (or the trusted tier) sends every output to review")])
        elif verified.verdict is Verdict.PASS and held:
            verified = dataclasses.replace(verified, checks=[*verified.checks, CheckResult(
                "leak-quarantine", Verdict.REVIEW, "the same job leaked dataset rows; nothing leaves unreviewed")])
        stored.append(store_platform_output(session, job=job, verified=verified, fmt=request.fmt,
                                            artifacts=artifacts))
    return stored


def store_dp_answers(session: Session, job: Job, *, policy: dict[str, Any], artifacts: Path) -> list[JobOutput]:
    """The DP answers the platform gave the job, as files it writes from its own record: released (their
    epsilon is the guarantee) unless the policy or the trusted tier sends everything to review."""
    auto_release = bool(policy["review"]["auto_release"]) and job.tier != "trusted"
    stored = []
    folder = platform_dir(artifacts, job.id)
    for number, content in enumerate(job_answers(folder), start=1):
        path = f"dp/answer-{number:03d}.json"
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        check = CheckResult("dp-answer", Verdict.PASS, "a differentially private answer the platform recorded and "
                                                       "wrote; its epsilon was charged to the contract")
        checks = [check] if auto_release else [check, CheckResult(
            "policy-review", Verdict.REVIEW, "the policy (or the trusted tier) sends every output to review")]
        status = OutputStatus.RELEASED if auto_release else OutputStatus.IN_REVIEW
        output = JobOutput(job_id=job.id, path=path, size=len(content), sha256=hashlib.sha256(content).hexdigest(),
                           kind="dp_result", verdict=(Verdict.PASS if auto_release else Verdict.REVIEW).value,
                           checks=[c.as_dict() for c in checks], status=status.value, origin=Origin.PLATFORM.value,
                           stored_path=str(target.relative_to(artifacts)))
        session.add(output)
        stored.append(output)
    session.flush()
    return stored


def _refusal(session: Session, job: Job, number: int, reason: str) -> JobOutput:
    output = JobOutput(job_id=job.id, path=f"tables/refused-{number}", size=0, sha256="", kind="table",
                       verdict=Verdict.BLOCK.value, checks=[CheckResult("table-spec", Verdict.BLOCK, reason).as_dict()],
                       status=OutputStatus.BLOCKED.value, origin=Origin.PLATFORM.value, stored_path=None)
    session.add(output)
    session.flush()
    return output
