"""Job operations for the API: submit, read, cancel, approve, review and download."""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import Select, func, select
from sqlalchemy.orm import object_session

from sandbox.auth.tokens import Principal, Role
from sandbox.catalog.service import get_version
from sandbox.context import Context
from sandbox.contracts import JobKind, Tier, require_usable
from sandbox.dp.mock_publication import find_mock
from sandbox.errors import Conflict, Forbidden, Invalid, NotFound
from sandbox.jobs.bundles import StagedBundle
from sandbox.jobs.lifecycle import TERMINAL, JobState, next_state
from sandbox.policies import get_policy_version, job_policy_body, party_policy_body
from sandbox.release import review
from sandbox.release.status import OutputStatus
from sandbox.store.models import (
    AuditEvent,
    Contract,
    DatasetVersion,
    Job,
    JobApproval,
    JobOutput,
    WorkerRecord,
)
from sandbox.store.parties import JobDataset, job_data_orgs, job_datasets, job_orgs, party_contracts
from sandbox.training.budget import hold_training_budgets
from sandbox.training.spec import TRAINER_COMMAND, TRAINING_IMAGE, TrainingSpec, training_plan


class ResourceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(default=1.0, gt=0, le=256)
    memory_mb: int = Field(default=1024, ge=64, le=1_048_576)
    timeout_s: int = Field(default=600, ge=1, le=604_800)
    gpus: int = Field(default=0, ge=0, le=16)


MAX_JOB_DATASETS = 20
_DATASET_REFERENCE = re.compile(r"([^@\s]{1,64})(?:@([1-9][0-9]{0,8}))?")


def dataset_reference(text: str) -> tuple[str, int | None]:
    """`NAME` or `NAME@VERSION` as (name, version or None); ValueError for anything else. Pure."""
    found = _DATASET_REFERENCE.fullmatch(text)
    if found is None:
        raise ValueError(f"datasets: {text[:80]!r} is not NAME or NAME@VERSION")
    return found.group(1), int(found.group(2)) if found.group(2) else None


class JobSpec(BaseModel):
    """The `spec` part of `POST /v1/jobs`."""

    model_config = ConfigDict(extra="forbid")

    contract: str = Field(min_length=1, max_length=40)
    # One dataset (`dataset`, at `version`), or several of different hospitals under one contract (`datasets`,
    # each NAME or NAME@VERSION; `dataset` may then be left out and is the first).
    dataset: str = Field(default="", max_length=64)
    datasets: list[str] = Field(default_factory=list, max_length=MAX_JOB_DATASETS)
    version: int | None = Field(default=None, ge=1)
    kind: Literal["analysis", "training", "dp_training"] = "analysis"
    image: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,39}$")
    command: list[str] = Field(default_factory=list, max_length=256)
    resources: ResourceRequest = Field(default_factory=ResourceRequest)
    training: TrainingSpec | None = None

    @model_validator(mode="after")
    def _dataset_rules(self) -> JobSpec:
        wanted = [dataset_reference(entry) for entry in self.datasets]
        if not self.dataset:
            if not wanted:
                raise ValueError("dataset: name the dataset the job reads (or several in `datasets`)")
            self.dataset, first_version = wanted[0]
            if self.version is not None and first_version is not None and self.version != first_version:
                raise ValueError(f"version {self.version} differs from the version in datasets[0]")
            self.version = self.version or first_version
        names = [name for name, _ in wanted]
        if len(set(names)) != len(names):
            raise ValueError("datasets: must not repeat a dataset")
        for name, version in wanted:
            if name == self.dataset and version is not None and self.version not in (None, version):
                raise ValueError(f"datasets: {name}@{version} differs from version {self.version}")
        return self

    def dataset_references(self) -> list[tuple[str, int | None]]:
        """Every dataset the job reads with the version asked for (None: the newest active), `dataset` first."""
        wanted = [dataset_reference(entry) for entry in self.datasets]
        others = [(name, version) for name, version in wanted if name != self.dataset]
        return [(self.dataset, self.version), *others]

    @model_validator(mode="after")
    def _kind_rules(self) -> JobSpec:
        if self.kind == "dp_training":
            if self.training is None or self.training.epsilon is None:
                raise ValueError("a dp_training job needs `training` with at least label, features and epsilon")
            if self.command:
                raise ValueError("a dp_training job runs the platform's trainer: send `model.py` in the code "
                                 "bundle and no command")
            if self.image not in (None, TRAINING_IMAGE):
                raise ValueError(f"a dp_training job runs in the {TRAINING_IMAGE!r} image")
            self.image = TRAINING_IMAGE
        else:
            if not self.command:
                raise ValueError("command: give the command to run")
            if self.training is not None and (self.training.epsilon is not None or self.training.delta is not None):
                raise ValueError("only dp_training spends epsilon; a free-form job's `training` names only "
                                 "label and features (for the membership-inference gate)")
            if self.training is not None and self.kind != "training":
                raise ValueError("`training` belongs to training and dp_training jobs")
            self.image = self.image or "analysis"
        return self

    @property
    def image_name(self) -> str:
        assert self.image is not None  # set by the validator
        return self.image


def resource_problems(resources: ResourceRequest, runtime: dict[str, Any]) -> list[str]:
    """Where a request exceeds the policy's runtime limits. Pure."""
    problems = []
    for field_name, limit_name in (("cpus", "max_cpus"), ("memory_mb", "max_memory_mb"),
                                   ("timeout_s", "max_timeout_s"), ("gpus", "max_gpus")):
        value, limit = getattr(resources, field_name), runtime[limit_name]
        if field_name == "gpus" and value and not limit:
            problems.append("resources.gpus: the policy allows no GPUs")
        elif value > limit:
            problems.append(f"resources.{field_name} {value} is above the policy's limit of {limit}")
    return problems


MEMORY_BUCKET = 64 * 1024 * 1024


def job_id() -> str:
    return f"j-{uuid.uuid4().hex[:16]}"


def jobs_dir(ctx: Context, job: str) -> Path:
    return ctx.settings.artifacts_dir / "jobs" / job


def usage_totals(ctx: Context, contract_id: str) -> dict[str, float]:
    rows = ctx.session.execute(select(Job.usage).where(Job.contract_id == contract_id)).scalars()
    totals = {"cpu_seconds": 0.0, "gpu_seconds": 0.0, "wall_seconds": 0.0, "bytes_released": 0.0}
    for usage in rows:
        for key in totals:
            totals[key] += float((usage or {}).get(key, 0.0))
    return totals


# A worker republishes itself every minute (sandbox.worker.IMAGE_REFRESH_S); one silent this long is gone.
LIVE_WORKER_S = 300.0


def submit_job(ctx: Context, *, spec: JobSpec, bundle: StagedBundle, image_id: str) -> Job:
    """Validate a submission against contract, tier, policy and quota, then store it.

    The bundle was unpacked and checked before this transaction (`stage_bundle`): unpacking inside it
    blocked every other writer for seconds (review 11.13). Here it only moves into place.
    """
    buyer = ctx.require_role(Role.BUYER)
    wanted = spec.dataset_references()
    contract = require_usable(ctx, spec.contract, kind=JobKind(spec.kind), dataset=spec.dataset,
                              also=[name for name, _ in wanted[1:]])
    # Each an active version (`get_version` reads only those), each named by the contract (checked above).
    versions = [get_version(ctx.session, name, number) for name, number in wanted]
    version = versions[0]
    if contract.tier == Tier.DP_ONLY.value:
        files = [v.dataset.name for v in versions if v.dataset.kind == "files"]
        if files and spec.kind != JobKind.DP_TRAINING.value:
            # dp_only code sees only DP answers and mocks; images never reach it. The platform's DP-SGD trainer
            # is the exception, as for tables: the worker decodes the pixels and only the trainer receives them.
            raise Invalid("a dp_only contract runs no buyer code on a file collection (the platform's DP-SGD "
                          "training and DP queries over its manifest are allowed)",
                          [f"dataset {name!r} is a file collection" for name in files])
        for each in versions:
            if spec.kind != JobKind.DP_TRAINING.value and find_mock(ctx.session, each) is None:
                raise Conflict(f"dp_only jobs run on the DP mock, and {each.dataset.name}@{each.version} has none "
                               "yet; a steward publishes it")
    entries = [JobDataset(name=v.dataset.name, version=v.version, org=v.dataset.owner_org) for v in versions]
    orgs = sorted({entry.org for entry in entries})
    policy_ref, policy_body = _submission_policy(ctx, contract, orgs)
    runtime = policy_body["runtime"]
    problems = resource_problems(spec.resources, runtime)
    if spec.image_name not in runtime["allowed_images"]:
        problems.append(f"image {spec.image_name!r} is not allowed by policy {policy_ref}")
    if spec.resources.gpus and not contract.quotas.get("gpu_hours"):
        problems.append("the contract has no GPU hours")
    if spec.resources.gpus:
        # Refused now rather than queued forever: no worker that could run it is alive.
        live_since = datetime.now(UTC) - timedelta(seconds=LIVE_WORKER_S)
        most = ctx.session.execute(select(func.max(WorkerRecord.gpus))
                                   .where(WorkerRecord.seen_at >= live_since)).scalar_one_or_none() or 0
        if most < spec.resources.gpus:
            problems.append(f"resources.gpus {spec.resources.gpus}: no live worker has that many GPUs "
                            f"(the most any has is {most}), so the job could never run")
    if spec.kind == JobKind.TRAINING.value and spec.training is None and contract.tier != Tier.DP_ONLY.value:
        problems.append("a training job names its label and features (`training`: {label, features}, or "
                        "--label/--features) so the membership-inference gate can attack the models it writes")
    training = _training_fields(spec, versions, contract) if spec.training is not None else None
    if problems:
        raise Invalid("the job spec exceeds what the contract and policy allow", problems)
    used = usage_totals(ctx, contract.id)
    quota_s = float(contract.quotas.get("cpu_hours", 0)) * 3600
    if used["cpu_seconds"] >= quota_s:
        raise Forbidden(f"contract {contract.id} has used its {contract.quotas.get('cpu_hours')} CPU-hours",
                        object=contract.id)
    if spec.resources.gpus and used["gpu_seconds"] >= float(contract.quotas.get("gpu_hours", 0)) * 3600:
        raise Forbidden(f"contract {contract.id} has used its {contract.quotas.get('gpu_hours')} GPU-hours",
                        object=contract.id)
    identifier = job_id()
    directory = jobs_dir(ctx, identifier)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(bundle.folder, directory)
    try:
        if training is not None and spec.kind == JobKind.DP_TRAINING.value:
            if not (directory / "code" / str(training["spec"]["model"])).is_file():
                raise Invalid(f"the code bundle has no {training['spec']['model']}, the module with build_model")
            # Each dataset's budget pays in full, all or none (hold_training_budgets).
            reservations = hold_training_budgets(ctx.session, job_id=identifier, contract_id=contract.id,
                                                 datasets=[entry.name for entry in entries],
                                                 epsilon=float(training["epsilon"]), delta=float(training["delta"]))
            training["reservation"] = reservations[spec.dataset].id
            training["reservations"] = {name: held.id for name, held in reservations.items()}
        return _store_job(ctx, spec=spec, bundle=bundle, image_id=image_id, identifier=identifier,
                          contract=contract, version=version, policy_ref=policy_ref, policy_body=policy_body,
                          buyer=buyer, training=training, entries=entries, orgs=orgs)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


# DP-SGD needs a delta; without one in the spec, this much of the contract's delta is asked for.
DEFAULT_TRAINING_DELTA = 1e-6


def _submission_policy(ctx: Context, contract: Contract, orgs: list[str]) -> tuple[str, dict[str, Any]]:
    """The policy a new job runs under, as `name@version` and body: the one of the org whose data it reads,
    or for data of several orgs the strictest of theirs (named by the contract's own policy; the job's
    body is always recomputed from the parties by `sandbox.policies.job_policy_body`)."""
    contract_ref = f"{contract.policy_name}@{contract.policy_version}"
    if not contract.parties:
        return contract_ref, get_policy_version(ctx.session, contract.policy_name, contract.policy_version).body
    body, refs = party_policy_body(ctx.session, contract.id, orgs)
    return (refs[0] if len(refs) == 1 else contract_ref), body


def _training_fields(spec: JobSpec, versions: list[DatasetVersion], contract: Contract) -> dict[str, Any]:
    """What the platform keeps of a training spec: the spec, the encoding fixed from the card now, and for
    dp_training the (epsilon, delta) to hold and each unit's row bound (as DP queries bound it).

    Across several datasets the encoding must be the same on every card: one model reads them all."""
    assert spec.training is not None
    card = versions[0].dataset.card
    plan = training_plan(card, spec.training)
    differences = []
    for other in versions[1:]:
        other_plan = training_plan(other.dataset.card, spec.training).as_dict()
        for key, value in plan.as_dict().items():
            if other_plan.get(key) != value:
                differences.append(f"{key}: {versions[0].dataset.name} has {value!r}, {other.dataset.name} has "
                                   f"{other_plan.get(key)!r}")
    if differences:
        raise Invalid("the datasets' cards encode the training spec differently; one model cannot read them all",
                      differences)
    fields: dict[str, Any] = {"spec": spec.training.model_dump(), "plan": plan.as_dict()}
    if spec.kind == JobKind.DP_TRAINING.value:
        if not contract.delta:
            raise Invalid("DP-SGD needs a delta > 0, and this contract is pure DP (delta 0)",
                          ["the contract's delta is 0; a steward grants a delta for dp_training"])
        delta = spec.training.delta if spec.training.delta is not None else min(DEFAULT_TRAINING_DELTA,
                                                                                  contract.delta)
        rows = max(_rows_per_unit(v.dataset.card) for v in versions)
        fields.update(epsilon=spec.training.epsilon, delta=delta, max_rows_per_unit=rows)
    return fields


def _rows_per_unit(card: dict[str, Any]) -> int:
    """Each privacy unit's row bound on a card, as DP queries bound it."""
    settings = card.get("dp") or {}
    return 1 if card.get("privacy_unit_rows") == "one" else \
        int(settings.get("rows_per_unit", 1)) * int(settings.get("groups_per_unit", 1))


def _store_job(ctx: Context, *, spec: JobSpec, bundle: StagedBundle, image_id: str, identifier: str,
               contract: Contract, version: DatasetVersion, policy_ref: str, policy_body: dict[str, Any],
               buyer: Principal, entries: list[JobDataset], orgs: list[str],
               training: dict[str, Any] | None = None) -> Job:
    # Data of several hospitals: each approves for its own data, whatever its policy says (issue 17).
    needs_approval = bool(policy_body["review"].get("approve_jobs", False)) or len(orgs) > 1
    now = datetime.now(UTC)
    job = Job(
        id=identifier, contract_id=contract.id, buyer_org=buyer.org, submitted_by=buyer.sub,
        dataset=spec.dataset, dataset_version=version.version, datasets=[entry.as_dict() for entry in entries],
        kind=spec.kind, tier=contract.tier, policy=policy_ref, image=spec.image_name, image_id=image_id,
        command=list(TRAINER_COMMAND) if spec.kind == JobKind.DP_TRAINING.value else spec.command,
        training=training,
        resources=spec.resources.model_dump(), code_sha256=bundle.sha256, code_bytes=bundle.summary.expanded_bytes,
        state=(JobState.PENDING_APPROVAL if needs_approval else JobState.QUEUED).value,
        reason="" if image_id else f"waiting for the workers to publish image {spec.image_name!r}",
        usage={}, created_at=now, updated_at=now,
    )
    ctx.session.add(job)
    ctx.session.flush()
    ctx.record("job.submit", "job", job.id, contract=contract.id, dataset=f"{spec.dataset}@{version.version}",
               image=spec.image_name, image_id=image_id, command=job.command, code_sha256=bundle.sha256,
               state=job.state, kind=spec.kind, datasets=[f"{e.name}@{e.version}" for e in entries], orgs=orgs,
               **({"training": {k: v for k, v in training.items() if k != "plan"}} if training else {}))
    return job


def visible_jobs(ctx: Context, query: Select[Job]) -> Select[Job]:
    """Restrict a query over jobs to those the caller may see: a buyer its org's jobs, a steward the
    jobs run under contracts naming its own org's data (review 11.10, issue 17)."""
    if isinstance(ctx.actor, Principal) and ctx.actor.role is Role.BUYER:
        return query.where(Job.buyer_org == ctx.actor.org)
    if isinstance(ctx.actor, Principal) and ctx.actor.role is Role.STEWARD:
        return query.where(Job.contract_id.in_(party_contracts(ctx.actor.org)))
    return query


def get_job(ctx: Context, identifier: str, *, for_update: bool = False) -> Job:
    """A job the caller may see (`visible_jobs`); any other is 404, as a missing one is."""
    ctx.require_role(Role.BUYER, Role.STEWARD)
    query = visible_jobs(ctx, select(Job).where(Job.id == identifier))
    if for_update:
        query = query.with_for_update()
    job = ctx.session.execute(query).scalar_one_or_none()
    if job is None or not reads_stewards_data(ctx, job):
        raise NotFound(f"job {identifier!r} does not exist")
    return job


def reads_stewards_data(ctx: Context, job: Job) -> bool:
    """False for a steward whose org is a party to the job's contract but holds none of the data the job
    reads: another hospital's job under a shared contract is not theirs to read (its outputs, checks)."""
    if not (isinstance(ctx.actor, Principal) and ctx.actor.role is Role.STEWARD) or not job.datasets:
        return True
    return ctx.actor.org in job_data_orgs(ctx.session, job)


def job_to_decide(ctx: Context, identifier: str) -> tuple[Principal, Job]:
    """The steward and the job they decide on (approval, review): a job of their own org's data,
    never one their own org submitted, however the data's org is set."""
    steward = ctx.require_role(Role.STEWARD)
    submitted_by_own_org = ctx.session.execute(
        select(Job.id).where(Job.id == identifier, Job.buyer_org == steward.org)).first()
    if submitted_by_own_org is not None:
        # 403, not 404: the buyer org's own members know its jobs; it is the right that is refused.
        raise Forbidden("a steward may not decide on their own organisation's jobs or outputs", object=identifier)
    job = get_job(ctx, identifier, for_update=True)
    if steward.org not in job_data_orgs(ctx.session, job):
        # A party to the contract whose data this job does not read has nothing to decide on it.
        raise NotFound(f"job {identifier!r} does not exist")
    return steward, job


def list_jobs(ctx: Context, *, state: str | None = None, limit: int = 100) -> list[Job]:
    ctx.require_role(Role.BUYER, Role.STEWARD)
    query = visible_jobs(ctx, select(Job).order_by(Job.created_at.desc()).limit(limit))
    if state:
        query = query.where(Job.state == state)
    return [job for job in ctx.session.execute(query).scalars() if reads_stewards_data(ctx, job)]


def move(ctx: Context, job: Job, target: JobState, reason: str | None = None, **details: Any) -> None:
    """Apply one lifecycle transition and audit it; every state change goes through here."""
    previous = job.state
    job.state = next_state(job.state, target).value
    now = datetime.now(UTC)
    job.updated_at = now
    if reason is not None:
        job.reason = reason
    if target is JobState.RUNNING:
        job.started_at = now
    if target in TERMINAL:
        job.finished_at = now
    ctx.record(f"job.{target.value}", "job", job.id, previous=previous, reason=job.reason, **details)


def cancel_job(ctx: Context, identifier: str) -> Job:
    principal = ctx.require_role(Role.BUYER, Role.STEWARD)
    job = get_job(ctx, identifier, for_update=True)
    if JobState(job.state) in TERMINAL:
        raise Conflict(f"job {job.id} is already {job.state}")
    # The worker sees a cancelled job that still has a container and stops it.
    move(ctx, job, JobState.CANCELLED, reason=f"cancelled by {principal.sub}")
    return job


def decide_approval(ctx: Context, identifier: str, *, approve: bool, comment: str = "") -> Job:
    """A steward approves or rejects a job for their org's data. A job reading data of several orgs is
    queued once a steward of each approved; any of them rejecting rejects it."""
    steward, job = job_to_decide(ctx, identifier)
    orgs = job_data_orgs(ctx.session, job)
    if job.state != JobState.PENDING_APPROVAL.value:
        raise Conflict(f"job {job.id} is {job.state}, not pending approval")
    if not approve:
        move(ctx, job, JobState.REJECTED, reason=f"rejected by {steward.sub}: {comment}".strip(": "), org=steward.org)
        return job
    if any(approval.org == steward.org for approval in job.approvals):
        raise Conflict(f"{steward.org} already approved job {job.id}")
    ctx.session.add(JobApproval(job_id=job.id, org=steward.org, steward=steward.sub, comment=comment,
                                at=datetime.now(UTC)))
    ctx.session.flush()
    ctx.session.refresh(job, ["approvals"])
    waiting = sorted(set(orgs) - {approval.org for approval in job.approvals})
    if waiting:
        ctx.record("job.approve", "job", job.id, approved_by=steward.sub, org=steward.org, comment=comment,
                   waiting=waiting)
        job.reason = f"waiting for the approval of {', '.join(waiting)}"
        job.updated_at = datetime.now(UTC)
        return job
    move(ctx, job, JobState.QUEUED, reason="", approved_by=steward.sub, comment=comment, org=steward.org)
    return job


def _seconds(value: float, steward: bool) -> float:
    return value if steward else float(math.ceil(value))


def _whole_seconds(moment: datetime | None) -> str | None:
    return moment.replace(microsecond=0).isoformat() if moment else None


def buyer_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Usage coarsened for buyers: a job's exact timing and memory can carry bits of what it read."""
    coarse: dict[str, Any] = {}
    for key, value in usage.items():
        if key.endswith("_seconds"):
            coarse[key] = float(math.ceil(float(value)))
        elif key.endswith("_bytes") and key != "bytes_released":
            coarse[key] = float(math.ceil(float(value) / MEMORY_BUCKET) * MEMORY_BUCKET)
        else:
            coarse[key] = value
    return coarse


def buyer_reason(job: Job) -> str:
    """The job's reason without the exact exit code, which the job's code chooses."""
    reason = re.sub(r"\s*\(exit code -?\d+\)", "", job.reason)
    if re.fullmatch(r"exit code -?\d+", reason):
        return "exit code 0" if job.exit_code == 0 else "the job exited with an error"
    return reason


def job_view(job: Job, *, steward: bool) -> dict[str, Any]:
    exit_code = job.exit_code if steward or job.exit_code is None else int(job.exit_code != 0)
    return {
        "id": job.id, "contract": job.contract_id, "buyer_org": job.buyer_org, "submitted_by": job.submitted_by,
        "dataset": job.dataset, "version": job.dataset_version, "kind": job.kind, "tier": job.tier,
        "policy": job.policy, "image": job.image, "image_id": job.image_id, "command": job.command,
        "resources": job.resources, "state": job.state, "reason": job.reason if steward else buyer_reason(job),
        "exit_code": exit_code, "usage": job.usage if steward else buyer_usage(job.usage),
        "created_at": job.created_at.isoformat(),
        "started_at": (job.started_at.isoformat() if job.started_at else None) if steward else
        _whole_seconds(job.started_at),
        "finished_at": (job.finished_at.isoformat() if job.finished_at else None) if steward else
        _whole_seconds(job.finished_at),
        "outputs": review.outputs_view(list(job.outputs), steward=steward),
        **({"training": training_view(job.training)} if job.training else {}),
        "datasets": filled_datasets(job),
        "approvals": [{"org": a.org, "steward": a.steward, "comment": a.comment, "at": a.at.isoformat()}
                      for a in job.approvals],
    }


def filled_datasets(job: Job) -> list[dict[str, Any]]:
    """`job_datasets` as dicts, an older job's one dataset given its contract owner's org."""
    entries = [entry.as_dict() for entry in job_datasets(job)]
    session = object_session(job)
    if session is not None and not job.datasets:
        owners = job_data_orgs(session, job)
        entries = [{**entry, "org": owners[0] if owners else ""} for entry in entries]
    return entries


def training_view(training: dict[str, Any]) -> dict[str, Any]:
    """A training job's spec, encoding, budget and progress as its buyer and the steward see them."""
    return {key: training[key] for key in ("spec", "plan", "epsilon", "delta", "max_rows_per_unit",
                                           "epsilon_charged", "epsilon_charged_by_dataset", "progress", "split",
                                           "gate") if key in training}


def released_file(ctx: Context, identifier: str, path: str) -> tuple[JobOutput, Path]:
    job = get_job(ctx, identifier)
    for output in job.outputs:
        if output.path == path and (not ctx.is_buyer or review.visible_to_buyer(output)):
            if output.status != OutputStatus.RELEASED.value or output.stored_path is None:
                raise Forbidden(f"{path} is {output.status}, not released", object=f"{job.id}:{path}")
            ctx.record("job.output.download", "job", job.id, path=path, sha256=output.sha256)
            return output, ctx.settings.artifacts_dir / output.stored_path
    raise NotFound(f"job {identifier} has no output {path!r}")


def output_for_review(ctx: Context, identifier: str, path: str) -> tuple[JobOutput, Path]:
    _steward, job = job_to_decide(ctx, identifier)
    for output in job.outputs:
        if output.path == path and output.stored_path is not None:
            ctx.record("job.output.inspect", "job", job.id, path=path, sha256=output.sha256)
            return output, ctx.settings.artifacts_dir / output.stored_path
    raise NotFound(f"job {identifier} has no stored output {path!r}")


def settle_review(ctx: Context, job: Job) -> None:
    """Once no file waits for review, the job reaches its final state."""
    if job.state != JobState.IN_REVIEW.value or any(o.status == OutputStatus.IN_REVIEW.value for o in job.outputs):
        return
    move(ctx, job, JobState.DONE if job.exit_code == 0 else JobState.FAILED)


def review_queue(ctx: Context) -> list[Job]:
    """Jobs with files in review that the steward may decide: their org's data, not their org's jobs."""
    steward = ctx.require_role(Role.STEWARD)
    waiting = select(JobOutput.job_id).where(JobOutput.status == OutputStatus.IN_REVIEW.value).distinct()
    query = visible_jobs(ctx, select(Job).where(Job.id.in_(waiting), Job.buyer_org != steward.org))
    return [job for job in ctx.session.execute(query.order_by(Job.created_at)).scalars()
            if steward.org in job_data_orgs(ctx.session, job)]


def reviewers_needed(ctx: Context, job: Job) -> int:
    return int(job_policy_body(ctx.session, job)["review"]["reviewers"])


def decide_outputs(ctx: Context, identifier: str, *, release: list[str], reject: list[str], comment: str,
                   signer: Any) -> Job:
    """A steward's per-file decisions (`sandbox.release.review`), then the manifest and the job's state.
    A steward of the submitting org never reviews its outputs."""
    steward, job = job_to_decide(ctx, identifier)
    review.record_decisions(ctx, job, steward=steward, release=release, reject=reject, comment=comment,
                            needed=reviewers_needed(ctx, job))
    review.sign_manifest(job, signer)
    settle_review(ctx, job)
    return job


def release_report(ctx: Context, identifier: str) -> dict[str, Any]:
    """The job's release report, as the caller may see it (`sandbox.release.review.release_report`)."""
    job = get_job(ctx, identifier)
    steward = not ctx.is_buyer
    return review.release_report(ctx, job, steward=steward, needed=reviewers_needed(ctx, job),
                                 reason=job.reason if steward else buyer_reason(job))


def org_usage_totals(ctx: Context, contract: Contract, org: str) -> tuple[int, dict[str, float]]:
    """The jobs of `contract` that read `org`'s data and `org`'s share of their usage: a job reading data of
    several orgs is split equally among them (issue 17)."""
    owner = contract.owner_org
    totals = {"cpu_seconds": 0.0, "gpu_seconds": 0.0, "wall_seconds": 0.0, "bytes_released": 0.0}
    count = 0
    for job in ctx.session.execute(select(Job).where(Job.contract_id == contract.id)).scalars():
        orgs = job_orgs(job, owner=owner)
        if org not in orgs:
            continue
        count += 1
        for key in totals:
            totals[key] += float((job.usage or {}).get(key, 0.0)) / len(orgs)
    return count, totals


def usage_report(ctx: Context) -> list[dict[str, Any]]:
    """Usage per contract: a steward sees its org's share of the contracts naming its data, a buyer all of
    its own org's."""
    principal = ctx.require_role(Role.STEWARD, Role.BUYER)
    steward = not ctx.is_buyer
    query = select(Contract).order_by(Contract.created_at)
    if ctx.is_buyer:
        query = query.where(Contract.buyer_org == principal.org)
    else:
        query = query.where(Contract.id.in_(party_contracts(principal.org)))
    report = []
    for contract in ctx.session.execute(query).scalars():
        if steward:
            jobs, totals = org_usage_totals(ctx, contract, principal.org)
        else:
            totals = usage_totals(ctx, contract.id)
            jobs = ctx.session.execute(select(func.count(Job.id)).where(Job.contract_id == contract.id)).scalar_one()
        report.append({"contract": contract.id, "buyer_org": contract.buyer_org, "jobs": jobs,
                       "cpu_hours": round(_seconds(totals["cpu_seconds"], steward) / 3600, 6),
                       "cpu_hours_quota": contract.quotas.get("cpu_hours"),
                       "wall_hours": round(_seconds(totals["wall_seconds"], steward) / 3600, 6),
                       "gpu_hours": round(totals["gpu_seconds"] / 3600, 6),
                       "bytes_released": int(totals["bytes_released"])})
    return report


def last_approved_job(ctx: Context, job: Job) -> Job | None:
    """The same buyer org's latest earlier job that a steward approved (visible to the caller), for a code diff."""
    earlier = list(ctx.session.execute(visible_jobs(ctx, select(Job).where(
        Job.buyer_org == job.buyer_org, Job.created_at < job.created_at, Job.id != job.id,
    ).order_by(Job.created_at.desc()).limit(200))).scalars())
    if not earlier:
        return None
    approvals = ctx.session.execute(select(AuditEvent.object_id, AuditEvent.details).where(
        AuditEvent.action == f"job.{JobState.QUEUED.value}", AuditEvent.object_type == "job",
        AuditEvent.object_id.in_([j.id for j in earlier])))
    approved = {object_id for object_id, details in approvals if (details or {}).get("approved_by")}
    return next((j for j in earlier if j.id in approved), None)
