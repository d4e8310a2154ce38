"""A training job's steps in the worker, beside the data: before its container starts, while it runs, and
when it ends.

dp_training: the rows, encoded and bounded per unit, wait in the job's platform folder and are handed
out once over the job's socket (`POST /training/data`); the platform's trainer takes them only after
the buyer's code has exported its model and is gone. A second request is refused, so code that took
the rows first makes the run fail, and the marker says the rows reached the container. At the end the
worker checks the trainer's record and weights, recomputes the epsilon, signs the record, and settles
the reservation.

training (free-form): the buyer's job sees only the training rows; the held-out rows stay in the
platform folder for the membership-inference gate. It reads one table: the gate has no held-out images.

A dp_training job reads every dataset it names (several hospitals' under one contract), tables or file
collections, into one set of rows whose units stay apart per dataset (`sandbox.training.data.run_arrays`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy.orm import Session

from runners.base import Collected, CollectedFile, JobRunner
from sandbox.catalog.service import get_version
from sandbox.context import Context
from sandbox.egress.verdicts import CheckResult, Verdict
from sandbox.errors import Conflict, Invalid
from sandbox.instance import Instance
from sandbox.local_http import BytesHandler
from sandbox.release.status import Origin, OutputStatus
from sandbox.release.tables import platform_dir
from sandbox.store.models import BudgetReservation, ImageRecord, Job, JobOutput
from sandbox.training.budget import settle_training_budget
from sandbox.training.data import RowSource, run_arrays, split_by_unit
from sandbox.training.gate import GateFailed, run_gate
from sandbox.training.record import RECORD_FILE, WEIGHTS_FILE, RecordProblem, verify_run
from sandbox.training.record import signed_record as sign_record
from sandbox.training.spec import TRAINING_IMAGE, plan_from_dict

DP_TRAINING, FREE_FORM = "dp_training", "training"
HOLDOUT_FRACTION = 0.25
MODEL_SUFFIXES = frozenset({".safetensors", ".onnx", ".skops"})
PROGRESS_EVERY_S = 1.0
SERVED = "served"  # marker: the rows left for the container


def training_dir(artifacts: Path, job_id: str) -> Path:
    return platform_dir(artifacts, job_id) / "training"


def train_split(artifacts: Path, job_id: str) -> tuple[Path, Path]:
    folder = training_dir(artifacts, job_id)
    return folder / "train.parquet", folder / "holdout.parquet"


def rows_served(artifacts: Path, job_id: str) -> bool:
    return (training_dir(artifacts, job_id) / SERVED).exists()


# Before the container starts -------------------------------------------------------------------------

def prepare_run(instance: Instance, job_id: str) -> dict[str, Any] | None:
    """Write what the job's container needs from the rows; what to add to `job.training` (None: nothing to do).

    Idempotent: a worker restarted mid-launch writes the same files again. Invalid: the job cannot run as asked
    (a collection file changed, images too large to hold, free-form training on a collection); the worker fails
    it with that reason.
    """
    artifacts = instance.settings.artifacts_dir
    with instance.read_session() as session:
        job = session.get(Job, job_id)
        if job is None or job.kind not in (DP_TRAINING, FREE_FORM):
            return None
        versions = [get_version(session, name, number) for name, number in _read_versions(job)]
        sources = [RowSource(artifacts / version.path, Path(version.reference) if version.reference else None)
                   for version in versions]
        parquet, card, training, tier = sources[0].parquet, versions[0].dataset.card, dict(job.training or {}), \
            job.tier
        dataset, number = job.dataset, job.dataset_version
    folder = training_dir(artifacts, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    if job.kind == FREE_FORM:
        if tier == "dp_only":
            return None  # it runs on the DP mock; its models never leave
        if len(sources) > 1 or sources[0].files is not None:
            raise Invalid("free-form training reads one table dataset: the membership-inference gate has no "
                          "held-out rows for file collections or several datasets; use dp_training")
        train, holdout = train_split(artifacts, job_id)
        kept, held = split_by_unit(parquet, str(card["privacy_unit"]), holdout_fraction=HOLDOUT_FRACTION,
                                   key=job_id, train_to=train, holdout_to=holdout)
        return {"split": {"train_rows": kept, "holdout_rows": held, "holdout_fraction": HOLDOUT_FRACTION}}
    plan, spec = plan_from_dict(training["plan"]), training["spec"]
    arrays = run_arrays(sources, plan, max_rows_per_unit=int(training["max_rows_per_unit"]), key=job_id)
    staged = folder / "data.npz.partial"
    staged.write_bytes(arrays.to_npz())
    os.replace(staged, folder / "data.npz")
    trainer = {"kind": DP_TRAINING, "dataset": dataset, "version": number, "model_module": spec["model"],
               "features": plan.feature_names, "label": plan.label.column, "task": plan.task,
               "n_features": plan.n_features, "n_outputs": plan.n_outputs, "epochs": spec["epochs"],
               "batch_size": spec["batch_size"], "learning_rate": spec["learning_rate"],
               "max_grad_norm": spec["max_grad_norm"], "epsilon": training["epsilon"], "delta": training["delta"],
               "n_units": arrays.n_units, "max_rows_per_unit": int(training["max_rows_per_unit"]),
               **({"input_shape": list(plan.image)} if plan.image is not None else {})}
    return {"trainer": trainer}


def _read_versions(job: Job) -> list[tuple[str, int]]:
    """Every (dataset, version) the job reads, its own first: `Job.datasets` as `sandbox.store.parties` reads it
    (training sits below the jobs package, so it reads the column itself)."""
    if job.datasets:
        return [(str(entry["name"]), int(entry["version"])) for entry in job.datasets]
    return [(job.dataset, job.dataset_version)]


def container_env(job: Job) -> dict[str, str]:
    """The trainer's spec, and how long the buyer's `build_model` and export may take: a tenth of the job's
    time, 30 s to 5 min (the trainer also waits that long before it reports that the rows were taken)."""
    trainer = (job.training or {}).get("trainer")
    if not trainer:
        return {}
    export_s = min(max(int(job.resources.get("timeout_s", 600)) // 10, 30), 300)
    return {"SANDBOX_TRAINING": json.dumps(trainer, sort_keys=True), "SANDBOX_TRAINER_EXPORT_TIMEOUT_S": str(export_s)}


# While it runs ---------------------------------------------------------------------------------------

def socket_routes(instance: Instance, job_id: str,
                  context: Callable[[], AbstractContextManager[Context]]) -> dict[str, BytesHandler]:
    """The dp_training routes of the job's socket: its rows, once, and the trainer's progress."""
    folder = training_dir(instance.settings.artifacts_dir, job_id)
    last_progress = [0.0]

    def rows(_body: dict[str, Any]) -> bytes:
        try:
            os.close(os.open(folder / SERVED, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise Conflict("this run's training rows were handed out already, to whichever process asked "
                           "first; they are never handed out twice") from None
        return (folder / "data.npz").read_bytes()

    def progress(body: dict[str, Any]) -> dict[str, Any]:
        step, steps, epsilon = body.get("step"), body.get("steps"), body.get("epsilon")
        if not (isinstance(step, int) and isinstance(steps, int) and isinstance(epsilon, int | float)
                and 0 <= step <= steps <= 100_000_000 and 0 <= epsilon < 1e6):
            raise ValueError("send {step, steps, epsilon} as numbers, 0 <= step <= steps")
        now = time.monotonic()
        if step < steps and now - last_progress[0] < PROGRESS_EVERY_S:
            return {"recorded": False}
        last_progress[0] = now
        with context() as ctx:
            job = ctx.session.get(Job, job_id, with_for_update=True)
            if job is not None and job.training is not None:
                job.training = {**job.training, "progress": {"step": step, "steps": steps,
                                                             "epsilon": round(float(epsilon), 6)}}
        return {"recorded": True}

    return {"/training/data": rows, "/training/progress": progress}


# When it ends ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlatformFile:
    path: str
    content: bytes
    kind: str
    checks: list[CheckResult] = field(default_factory=list)


@dataclass(frozen=True)
class RunOutcome:
    """What a finished dp_training run leaves: the platform's files, and what to charge."""

    files: list[PlatformFile]
    spent_epsilon: float | None
    whole: bool  # charge all that was held: the rows may have been read, and no valid record says how much
    problem: str | None = None


# What the trainer's exit codes mean (`sandbox_trainer.run`).
TRAINER_EXITS = {1: "the model was refused or failed to build", 2: "the training spec or environment was bad",
                 3: "the rows had been taken before the trainer asked for them (by the job's own code)",
                 4: "the worker failed or sent malformed rows", 5: "training failed"}
NOTHING_SPENT_EXITS = frozenset({1, 2, 4})


def finish_dp_run(instance: Instance, job_id: str, collected: Collected, exit_code: int | None) -> RunOutcome:
    """Check the trainer's weights and record, recompute the epsilon and sign the record. Outside any transaction.

    Only a run that exited 0 has outputs; anything else it left is discarded."""
    artifacts = instance.settings.artifacts_dir
    with instance.read_session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        training = dict(job.training or {})
        facts = {"job": job.id, "dataset": job.dataset, "version": job.dataset_version,
                 "bundle_sha256": job.code_sha256, "image_id": job.image_id, "contract": job.contract_id}
        read = _read_versions(job)
        if len(read) > 1:
            # The model learned from every hospital's data: the signed record names each version.
            facts["datasets"] = [{"name": name, "version": number} for name, number in read]
    served = rows_served(artifacts, job_id)
    if exit_code != 0:
        why = TRAINER_EXITS.get(exit_code or -1, f"the trainer was stopped (exit code {exit_code})")
        # A refused model, a bad spec or a failed transfer ends before any step: what leaves (the logs) was
        # written before the rows arrived or depends only on the model's graph, so nothing is charged.
        return RunOutcome([], None, whole=served and exit_code not in NOTHING_SPENT_EXITS,
                          problem=f"no model: {why}")
    found = {f.path: f for f in collected.files}
    record, weights = found.get(RECORD_FILE), found.get(WEIGHTS_FILE)
    if record is None or weights is None or "trainer" not in training:
        why = "the trainer left no weights and record" if served else "the run ended before the rows left the worker"
        return RunOutcome([], None, whole=served, problem=why)
    try:
        run = verify_run(record.stored_at.read_bytes(), weights.stored_at.read_bytes(),
                         expected=training["trainer"], held_epsilon=float(training["epsilon"]))
    except RecordProblem as exc:
        return RunOutcome([], None, whole=True, problem=str(exc))
    from sandbox.budgets.cost import EPSILON_SCALE, epsilon_units_up  # the grid the ledger charges on

    charged = min(epsilon_units_up(run.epsilon), epsilon_units_up(float(training["epsilon"]))) / EPSILON_SCALE
    signed = sign_record(run, job=facts, epsilon_charged=charged, signer=instance.signing_key,
                         key_id=instance.instance_id)
    summary = (f"trained by the platform with DP-SGD (privacy unit: each {training['plan']['unit']}): epsilon "
               f"{run.epsilon:.4g} at delta {training['delta']:g}, noise multiplier "
               f"{run.record['noise_multiplier']:.4g}, {run.record['steps']} steps; charged to the contract")
    check = CheckResult("dp-training", Verdict.PASS, summary)
    return RunOutcome([PlatformFile(f"model/{WEIGHTS_FILE}", weights.stored_at.read_bytes(), "model", [check]),
                       PlatformFile(f"model/{RECORD_FILE}", signed, "text", [check])],
                      spent_epsilon=run.epsilon, whole=False)


def store_dp_run(ctx: Context, job: Job, outcome: RunOutcome, *, policy: dict[str, Any], artifacts: Path) -> None:
    """Record the platform's files as outputs and settle the reservation, in the worker's transaction.

    A DP-trained model is released like a DP answer: its epsilon is the guarantee, so no person needs to
    judge it, unless the policy (or the trusted tier) sends everything to review.
    """
    auto_release = bool(policy["review"]["auto_release"]) and job.tier != "trusted"
    folder = platform_dir(artifacts, job.id)
    for file in outcome.files:
        target = folder / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.content)
        checks = file.checks if auto_release else [*file.checks, CheckResult(
            "policy-review", Verdict.REVIEW, "the policy (or the trusted tier) sends every output to review")]
        verdict = Verdict.PASS if auto_release else Verdict.REVIEW
        ctx.session.add(JobOutput(
            job_id=job.id, path=file.path, size=len(file.content), sha256=hashlib.sha256(file.content).hexdigest(),
            kind=file.kind, verdict=verdict.value, checks=[c.as_dict() for c in checks],
            status=(OutputStatus.RELEASED if auto_release else OutputStatus.IN_REVIEW).value,
            origin=Origin.PLATFORM.value, stored_path=str(target.relative_to(artifacts))))
    if outcome.problem is not None:
        ctx.session.add(JobOutput(
            job_id=job.id, path="model/refused", size=0, sha256="", kind="model", verdict=Verdict.BLOCK.value,
            checks=[CheckResult("dp-training", Verdict.BLOCK, outcome.problem).as_dict()],
            status=OutputStatus.BLOCKED.value, origin=Origin.PLATFORM.value, stored_path=None))
    ctx.session.flush()
    settle_job_budget(ctx, job, spent_epsilon=outcome.spent_epsilon, whole=outcome.whole, why=outcome.problem)


def settle_job_budget(ctx: Context, job: Job, *, spent_epsilon: float | None, whole: bool,
                      why: str | None) -> None:
    """Settle the job's reservations, one per dataset it reads (a no-op once settled), and keep what was
    charged on the job: on each dataset's ledger the same epsilon, since the model saw each in full."""
    training = dict(job.training or {})
    reservations: dict[str, str] = dict(training.get("reservations") or {})
    if not reservations and training.get("reservation"):
        reservations = {job.dataset: str(training["reservation"])}
    if not reservations:
        return
    charged = {dataset: settle_training_budget(ctx.session, reservation, spent_epsilon=spent_epsilon, whole=whole)
               for dataset, reservation in sorted(reservations.items())}
    if "epsilon_charged" in training:
        return
    first = charged.get(job.dataset, next(iter(charged.values())))
    job.training = {**training, "epsilon_charged": first,
                    **({"epsilon_charged_by_dataset": charged} if len(charged) > 1 else {})}
    if len(charged) == 1:
        ctx.record("training.budget.settle", "job", job.id, epsilon_charged=first, whole=whole,
                   **({"why": why} if why else {}))
        return
    for dataset, epsilon in charged.items():
        # One event per dataset: each hospital's ledger and invoice line (sandbox.billing) has its own.
        org = next((str(e.get("org", "")) for e in (job.datasets or []) if e.get("name") == dataset), "")
        ctx.record("training.budget.settle", "job", job.id, epsilon_charged=epsilon, whole=whole, dataset=dataset,
                   dataset_org=org, **({"why": why} if why else {}))


def unsettled_jobs(session: Session) -> list[str]:
    """Jobs whose training reservation is still held (`job:<id>` holders)."""
    from sandbox.budgets.ledger import JOB_HOLDER_PREFIX

    holders = session.query(BudgetReservation.holder).filter(
        BudgetReservation.state == "reserved", BudgetReservation.holder.like(f"{JOB_HOLDER_PREFIX}%")).all()
    return [holder.removeprefix(JOB_HOLDER_PREFIX) for (holder,) in holders]


def model_files(files: list[CollectedFile]) -> dict[str, CollectedFile]:
    return {f.path: f for f in files if PurePosixPath(f.path).suffix.lower() in MODEL_SUFFIXES}


def gate_results(instance: Instance, runner: JobRunner, job_id: str, files: list[CollectedFile],
                 policy: dict[str, Any]) -> tuple[dict[str, list[CheckResult]], dict[str, Any]]:
    """The membership-inference gate's checks for each model file a free-form training job wrote, and its
    report (counts and scores only) for the steward.

    Fails closed: a gate that cannot run blocks the models it was to check.
    """
    artifacts = instance.settings.artifacts_dir
    models = model_files(files)
    with instance.read_session() as session:
        job = session.get(Job, job_id)
        if job is None or job.kind != FREE_FORM or job.tier == "dp_only" or not models:
            return {}, {}
        image = session.get(ImageRecord, TRAINING_IMAGE)
        training, org = dict(job.training or {}), job.buyer_org
    train, holdout = train_split(artifacts, job_id)
    spec = training.get("spec") or {}
    plan = training.get("plan") or {}
    features = list(spec.get("features") or [])  # submission requires them; without, the gate fails closed
    thresholds = dict(policy["egress"]["models"].get("gate") or {})
    try:
        if image is None:
            raise GateFailed(f"the {TRAINING_IMAGE!r} image, in which the gate runs, is not on the workers")
        if not train.exists() or not holdout.exists():
            raise GateFailed("the job's training and held-out rows are gone")
        entries = run_gate(runner, job_id=job_id, org=org, image_id=image.image_id,
                           models={p: f.stored_at for p, f in models.items()}, train=train, holdout=holdout,
                           label=spec.get("label"), features=features, task=str(plan.get("task", "classification")),
                           scratch=training_dir(artifacts, job_id) / "gate")
    except GateFailed as exc:
        blocked = [CheckResult("membership-inference", Verdict.BLOCK, f"the gate could not run: {exc}")]
        return {path: blocked for path in models}, {"error": str(exc)[:2000]}
    from sandbox.egress.models import gate_checks

    return {path: gate_checks(entries.get(path) or {}, thresholds) for path in models}, entries

