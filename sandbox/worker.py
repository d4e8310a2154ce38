"""The worker: the only part that touches the runner. Each tick re-derives state and admits work.

A tick is safe to repeat and to interrupt: everything it knows comes from the store and from
the runner's `poll()`, never from memory, so a worker killed with SIGKILL and restarted picks
every job up where it was. With a kernel runner it also hosts the notebook servers of running
sessions (`sandbox.notebooks.servers`), from the store in the same way.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from runners.base import (
    Collected,
    CollectedFile,
    JobDefinition,
    JobRunner,
    KernelRunner,
    Resources,
    RunState,
    RunStatus,
)
from runners.images import IMAGES, ImageBuildError, image_digest
from sandbox.audit import SystemActor
from sandbox.catalog.service import get_dataset, get_version
from sandbox.context import Context
from sandbox.contracts import JobKind
from sandbox.dp.queries import QueryRequest, settle_abandoned_reservations, socket_handler
from sandbox.dp.socket_server import DpSocket
from sandbox.egress import CheckResult, OutputFacts, Verdict, detect_kind
from sandbox.egress.content import ContentContext, content_checks, ensure_fingerprints, sidecar
from sandbox.egress.leaks import leak_verdict
from sandbox.errors import Invalid
from sandbox.instance import Instance
from sandbox.jobs.lifecycle import TERMINAL, JobState
from sandbox.jobs.mounts import collection_problems, job_data, not_mounted
from sandbox.jobs.service import move, settle_review, usage_totals
from sandbox.logs import get_logger
from sandbox.notebooks.kernel_runners import kernel_runner, swarm_engines
from sandbox.notebooks.servers import NotebookServers
from sandbox.policies import job_policy_body
from sandbox.release.dp_answers import job_answers, platform_answer, record_job_answer
from sandbox.release.jobs import (
    Checked,
    buyer_files,
    spec_files,
    store_dp_answers,
    store_verified_tables,
    verified_tables,
    withheld_name,
)
from sandbox.release.review import sign_manifest
from sandbox.release.routing import LOG_PATHS, name_problem, route_outputs
from sandbox.release.status import Origin, OutputStatus
from sandbox.release.tables import earlier_releases, platform_dir
from sandbox.store.models import Contract, ImageRecord, Job, JobOutput, WorkerRecord
from sandbox.training import runs as training_runs
from sandbox.training.gate import job_of
from sandbox.training.record import RECORD_FILE, WEIGHTS_FILE

log = get_logger("sandbox.worker")
HEAD_BYTES = 64 * 1024
IMAGE_REFRESH_S = 60.0
STEP_THREADS = 8
USAGE_EVERY_S = 1.0
# Kernels no server owns, and what ended notebook sessions left, are looked for at start and this often.
NOTEBOOK_SWEEP_S = 30.0
NOTEBOOK_SWEEP = "notebook-sweep"  # the sweep's key among the steps in flight (job ids otherwise)


@dataclass(frozen=True)
class Capacity:
    """What the worker's machine may give to jobs at once."""

    cpus: float = 2.0
    memory_mb: int = 8192
    gpus: int = 0
    gpu_names: tuple[str, ...] = ()


def dp_socket_path(instance: Instance, job_id: str) -> Path:
    return instance.settings.dp_socket_root / instance.instance_id / job_id / "dp.sock"


def job_definition(instance: Instance, job: Job, *, dp_socket: Path | None = None,
                   session: Session | None = None) -> JobDefinition:
    directory = instance.settings.artifacts_dir / "jobs" / job.id
    if session is None:
        with instance.read_session() as own:
            data_files, data_folders = job_data(instance, job, own)
    else:
        data_files, data_folders = job_data(instance, job, session)
    resources = job.resources
    return JobDefinition(
        id=job.id, org=job.buyer_org, image=job.image_id, command=list(job.command),
        code_dir=directory / "code", data_files=data_files, data_folders=data_folders,
        env=training_runs.container_env(job),
        resources=Resources(cpus=float(resources["cpus"]), memory_mb=int(resources["memory_mb"]),
                            timeout_s=int(resources["timeout_s"]), gpus=int(resources.get("gpus", 0))),
        dp_socket=dp_socket, data_version=f"{job.dataset}.v{job.dataset_version}",
    )


def fair_order(queued: list[Job], running: list[Job]) -> list[Job]:
    """Queued jobs, interleaved so the org with the fewest running jobs goes first. Pure."""
    load: dict[str, int] = defaultdict(int)
    for job in running:
        load[job.buyer_org] += 1
    by_org: dict[str, list[Job]] = defaultdict(list)
    for job in sorted(queued, key=lambda j: j.created_at):
        by_org[job.buyer_org].append(job)
    ordered = []
    while by_org:
        org = min(by_org, key=lambda o: (load[o], by_org[o][0].created_at))
        ordered.append(by_org[org].pop(0))
        load[org] += 1
        if not by_org[org]:
            del by_org[org]
    return ordered


class WorkerBusy(RuntimeError):
    """Another worker already serves this instance on this machine."""


def hold_worker_lock(directory: Path) -> int:
    """An exclusive lock for the life of the process: two workers on one runner state would race."""
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / "worker.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise WorkerBusy(f"another worker holds {directory / 'worker.lock'}") from None
    return descriptor


def docker_worker(instance: Instance) -> Worker:
    """The worker for this instance on the local Docker engine (one per machine and instance)."""
    from runners.docker import DockerRunner
    from runners.docker_events import watch_job_containers
    from runners.kernels import DockerKernelRunner

    settings = instance.settings
    lock = hold_worker_lock(settings.runner_dir)
    try:
        runner = DockerRunner(state_dir=settings.runner_dir, instance_id=instance.instance_id)
    except BaseException:
        os.close(lock)  # no engine: let a later `sandbox worker` take the lock
        raise
    gpus = runner.use_host_gpus()
    if gpus.problem:
        log.warning("gpus_unavailable", problem=gpus.problem)
    capacity = Capacity(cpus=settings.worker_cpus, memory_mb=settings.worker_memory_mb, gpus=len(gpus.gpus),
                        gpu_names=tuple(gpu.name for gpu in gpus.gpus))
    worker = Worker(instance, runner, capacity,
                    kernels=DockerKernelRunner(instance_id=instance.instance_id, client=runner.client))
    worker.held.append(partial(os.close, lock))
    watch_job_containers(instance.instance_id, worker.wake, worker.stopping)
    return worker


def swarm_worker(instance: Instance) -> Worker:
    """The worker for this instance on a Docker swarm (settings.swarm_*): jobs run as services on its nodes.

    Job images are built on this machine's engine and pushed by the manager's engine to the registry the
    nodes pull from. The runner's state folder and the artifacts must be on a file system every node
    shares at the same path (`runners.swarm`); capacity is what the swarm's Ready nodes hold.
    """
    from runners.swarm import SwarmRunner

    settings = instance.settings
    lock = hold_worker_lock(settings.runner_dir)
    try:
        swarm = swarm_engines(settings)
        runner = SwarmRunner(swarm.manager, state_dir=settings.runner_dir, instance_id=instance.instance_id,
                             images=swarm.images, node_engines=swarm.node_engines, data_mode=settings.swarm_data)
        kernels = kernel_runner(settings, instance.instance_id, swarm=swarm)

        def capacity() -> Capacity:
            swarm = runner.capacity()
            return Capacity(cpus=swarm.cpus, memory_mb=swarm.memory_mb, gpus=swarm.gpus,
                            gpu_names=tuple(f"swarm GPU {index + 1}" for index in range(swarm.gpus)))

        worker = Worker(instance, runner, capacity(), kernels=kernels, capacity_source=capacity)
        worker.held.append(partial(os.close, lock))
        return worker
    except BaseException:
        os.close(lock)  # no swarm: let a later `sandbox worker` take the lock
        raise


def make_worker(instance: Instance) -> Worker:
    """The worker settings.runner names: this machine's Docker engine, or a Docker swarm."""
    if instance.settings.runner == "swarm":
        return swarm_worker(instance)
    return docker_worker(instance)


class Worker:
    def __init__(self, instance: Instance, runner: JobRunner, capacity: Capacity | None = None, *,
                 kernels: KernelRunner | None = None,
                 capacity_source: Callable[[], Capacity] | None = None) -> None:
        self.instance = instance
        self.runner = runner
        # Re-read when the worker republishes itself: a swarm's capacity changes as nodes come and go.
        self.capacity_source = capacity_source
        # Notebook servers run where kernels can: with no kernel runner, this worker hosts none.
        self.notebooks = NotebookServers(instance, kernels) if kernels is not None else None
        self._notebooks_swept_at = -NOTEBOOK_SWEEP_S
        self.capacity = capacity or Capacity()
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=STEP_THREADS, thread_name_prefix="sandbox-job")
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._usage_recorded: dict[str, float] = {}
        self._dp_sockets: dict[str, DpSocket] = {}
        self._dp_lock = threading.Lock()
        self._images_seen_at = -IMAGE_REFRESH_S
        # One worker per machine and instance (hold_worker_lock): the machine's name names the worker.
        self.name = socket.gethostname()[:200] or "worker"
        # What the worker holds while it runs (the runner folder's lock), let go of when it stops: a process
        # that steps down as the scheduler's leader (`sandbox.leader`) lives on, and its successor needs them.
        self.held: list[Callable[[], None]] = []

    def context(self) -> Any:
        return self.instance.context(SystemActor(sub="worker"))

    # The loop ------------------------------------------------------------------------------------

    def run_forever(self, interval_s: float = 0.5) -> None:
        log.info("worker_started")
        # The DP sockets answer from here: budget a killed worker held mid-query goes back first.
        settle_abandoned_reservations(self.instance)
        while not self.stopping.is_set():
            self._wake.clear()
            try:
                self.tick(wait=False)
            except Exception as exc:  # one bad tick must not end the worker
                log.error("worker_tick_failed", error=str(exc), exc_info=exc)
            self._wake.wait(interval_s)

    def wake(self) -> None:
        """Tick now rather than at the next interval (a job was submitted, or a container ended)."""
        self._wake.set()

    def stop(self, *, wait: bool = False) -> None:
        """Stop ticking and let go of what the worker holds; with `wait`, once the steps in flight have ended."""
        self.stopping.set()
        self._wake.set()
        self._pool.shutdown(wait=wait, cancel_futures=True)
        if self.notebooks is not None:
            # The sessions stay running in the store: the next worker starts their servers again.
            self.notebooks.stop_all()
        while self.held:
            self.held.pop()()

    def start_thread(self, interval_s: float = 0.5) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, args=(interval_s,), name="sandbox-worker", daemon=True)
        thread.start()
        return thread

    def tick(self, *, wait: bool = True) -> None:
        """One pass: admit queued work, follow running jobs, then host notebook servers. Runner steps run
        in a pool so eight jobs starting together do not queue behind one another; `wait` lets a caller
        (a test, a one-shot command) wait for this pass's steps to end."""
        if time.monotonic() - self._images_seen_at > IMAGE_REFRESH_S:
            if self.capacity_source is not None:
                try:
                    self.capacity = self.capacity_source()
                except Exception as exc:  # keep the last known capacity
                    log.warning("capacity_unavailable", error=str(exc))
            self.publish_worker()
            self.refresh_images()
        futures = self.admit()
        futures += self.reconcile()
        futures += self.host_notebooks()
        if wait:
            for future in futures:
                future.result()

    def _in_background(self, job_id: str, step: Callable[[], object]) -> Future[None] | None:
        """Run `step` for `job_id` in the pool unless a step for that job is already in flight."""
        with self._busy_lock:
            if job_id in self._busy:
                return None
            self._busy.add(job_id)

        def run() -> None:
            try:
                step()
            except Exception as exc:  # a failed step is retried from scratch on a later tick
                log.error("job_step_failed", job=job_id, error=str(exc), exc_info=exc)
            finally:
                with self._busy_lock:
                    self._busy.discard(job_id)
                self.wake()

        return self._pool.submit(run)

    def _busy_jobs(self) -> set[str]:
        with self._busy_lock:
            return set(self._busy)

    def refresh_images(self) -> None:
        """Publish the job images this worker's engine has, so the API can resolve names."""
        found = {}
        for name in IMAGES:
            try:
                found[name] = image_digest(name)
            except ImageBuildError as exc:
                log.warning("image_unavailable", image=name, error=str(exc))
        with self.context() as ctx:
            for name, image_id in found.items():
                record = ctx.session.get(ImageRecord, name)
                if record is None:
                    ctx.session.add(ImageRecord(name=name, image_id=image_id, seen_at=datetime.now(UTC)))
                    ctx.record("image.register", "image", name, image_id=image_id)
                elif record.image_id != image_id:
                    ctx.record("image.update", "image", name, image_id=image_id, previous=record.image_id)
                    record.image_id, record.seen_at = image_id, datetime.now(UTC)
        self._images_seen_at = time.monotonic()

    def publish_worker(self) -> None:
        """Publish this worker and what its machine gives jobs; `seen_at` says it is alive."""
        capacity = self.capacity
        now = datetime.now(UTC)
        with self.context() as ctx:
            record = ctx.session.get(WorkerRecord, self.name, with_for_update=True)
            if record is None:
                record = WorkerRecord(id=self.name, host=socket.gethostname()[:255], seen_at=now)
                ctx.session.add(record)
            published = (record.gpus, list(record.gpu_names or []), record.cpus, record.memory_mb)
            record.gpus, record.gpu_names = capacity.gpus, list(capacity.gpu_names)
            record.cpus, record.memory_mb, record.seen_at = capacity.cpus, capacity.memory_mb, now
            if published != (capacity.gpus, list(capacity.gpu_names), capacity.cpus, capacity.memory_mb):
                ctx.record("worker.publish", "worker", self.name, gpus=capacity.gpus,
                           gpu_names=list(capacity.gpu_names), cpus=capacity.cpus, memory_mb=capacity.memory_mb)

    # Notebook servers ---------------------------------------------------------------------------------

    def host_notebooks(self) -> list[Future[None]]:
        """Start a server for each running session that has none here, stop those of ended sessions, and,
        at start and every NOTEBOOK_SWEEP_S, remove kernels no live server owns and ended sessions' leftovers."""
        notebooks = self.notebooks
        if notebooks is None:
            return []
        sweep = time.monotonic() - self._notebooks_swept_at >= NOTEBOOK_SWEEP_S
        plan = notebooks.plan(busy=self._busy_jobs(), leftovers=sweep)
        futures = [self._in_background(job_id, partial(notebooks.start, job_id)) for job_id in plan.start]
        futures += [self._in_background(job_id, partial(notebooks.stop, job_id)) for job_id in plan.stop]
        if sweep:
            self._notebooks_swept_at = time.monotonic()
            futures.append(self._in_background(NOTEBOOK_SWEEP, partial(notebooks.remove_orphan_kernels,
                                                                       self._busy_jobs)))
        return [f for f in futures if f is not None]

    # Reconciliation -------------------------------------------------------------------------------

    def reconcile(self) -> list[Future[None]]:
        managed = self.runner.managed_jobs()
        busy = self._busy_jobs()
        with self.instance.read_session() as session:
            # Notebook sessions are jobs too, but their kernels belong to the notebook servers, not this worker.
            jobs = {j.id: j.state for j in session.execute(
                select(Job).where(Job.id.in_(managed) | Job.state.in_([JobState.RUNNING.value]))
                .where(Job.kind != JobKind.NOTEBOOK.value)).scalars()}
        futures = []
        # A job's gate container runs inside that job's finishing step.
        managed = {m for m in managed if job_of(m) == m or job_of(m) not in busy}
        for job_id in managed - busy:
            state = jobs.get(job_id)
            if state is None or JobState(state) in TERMINAL or state == JobState.IN_REVIEW.value:
                # Unknown to the store, cancelled, or already settled: nothing of it may keep running.
                futures.append(self._in_background(job_id, partial(self._remove, job_id, known=state is not None)))
            elif state == JobState.QUEUED.value:
                self._adopt(job_id)
        for job_id, state in jobs.items():
            if state == JobState.RUNNING.value and job_id not in busy:
                futures.append(self._follow(job_id))
        self._settle_ended_training(busy)
        return [f for f in futures if f is not None]

    def _settle_ended_training(self, busy: set[str]) -> None:
        """Settle the budget a DP training job still holds once it can no longer run: cancelled, rejected,
        failed, or finished without its outcome. All of it if the rows reached its container, else nothing."""
        with self.instance.read_session() as session:
            holding = training_runs.unsettled_jobs(session)
            if not holding:
                return
            ended = [job.id for job in session.execute(select(Job).where(Job.id.in_(holding))).scalars()
                     if job.id not in busy and job.state not in (JobState.PENDING_APPROVAL.value,
                                                                 JobState.QUEUED.value, JobState.RUNNING.value)]
        artifacts = self.instance.settings.artifacts_dir
        for job_id in ended:
            with self.context() as ctx:
                job = ctx.session.get(Job, job_id, with_for_update=True)
                if job is not None:
                    served = training_runs.rows_served(artifacts, job_id)
                    training_runs.settle_job_budget(
                        ctx, job, spent_epsilon=None, whole=served,
                        why=f"the job ended {job.state} " + ("after its rows reached the container" if served
                                                             else "before its rows left the worker"))

    def _remove(self, job_id: str, *, known: bool) -> None:
        if known:
            with self.context() as ctx:
                job = ctx.session.get(Job, job_id, with_for_update=True)
                if job is not None and job.state == JobState.CANCELLED.value:
                    # Cancelled while it ran: its usage stops at the last figure recorded, which nothing
                    # audited yet (a second call, after a restart, records the same total: it adds nothing).
                    _audit_usage(ctx, job)
        self.runner.terminate(job_id)
        self.runner.cleanup(job_id)
        self._close_dp_socket(job_id)
        if not known:
            log.warning("removed_unknown_container", job=job_id)

    def _adopt(self, job_id: str) -> None:
        # Started by a worker that died before it could record so.
        with self.context() as ctx:
            job = ctx.session.get(Job, job_id, with_for_update=True)
            if job is not None and job.state == JobState.QUEUED.value:
                move(ctx, job, JobState.RUNNING, adopted=True)

    def _follow(self, job_id: str) -> Future[None] | None:
        status = self.runner.poll(job_id)
        if status.state is RunState.UNKNOWN:
            with self.context() as ctx:
                job = ctx.session.get(Job, job_id, with_for_update=True)
                if job is not None and job.state == JobState.RUNNING.value:
                    _audit_usage(ctx, job)
                    move(ctx, job, JobState.FAILED, reason="the job's container vanished")
            return None
        if status.lost is not None:
            return self._in_background(job_id, partial(self._lost, job_id, status))
        if status.state is RunState.PREPARED:
            with self.instance.read_session() as session:
                job = session.get(Job, job_id)
                definition = job_definition(self.instance, job, session=session) if job else None
            if definition is not None:
                return self._in_background(job_id, partial(self.runner.start, definition))
            return None
        if status.state is RunState.RUNNING:
            self._reopen_dp_socket(job_id)
            self._record_usage(job_id, status)
            return None
        return self._in_background(job_id, partial(self._finish, job_id, status))

    def _record_usage(self, job_id: str, status: RunStatus) -> None:
        # A write per running job per tick would queue every other write behind it; usage and the
        # CPU quota are settled every USAGE_EVERY_S, and exactly at exit.
        now = time.monotonic()
        if now - self._usage_recorded.get(job_id, -USAGE_EVERY_S) < USAGE_EVERY_S:
            return
        self._usage_recorded[job_id] = now
        with self.context() as ctx:
            job = ctx.session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING.value:
                return
            gpus = int(job.resources.get("gpus", 0))
            job.usage = {**job.usage, **_usage(status, gpus=gpus, earlier=job.usage)}
            contract = ctx.session.get(Contract, job.contract_id)
            quotas = contract.quotas if contract else {}
            quota_s = float(quotas.get("cpu_hours", 0)) * 3600
            totals = usage_totals(ctx, job.contract_id)
            if totals["cpu_seconds"] > quota_s:
                _audit_usage(ctx, job)
                move(ctx, job, JobState.CANCELLED, reason="quota: the contract's CPU-hours are used up")
            elif gpus and totals["gpu_seconds"] > float(quotas.get("gpu_hours", 0)) * 3600:
                _audit_usage(ctx, job)
                move(ctx, job, JobState.CANCELLED, reason="quota: the contract's GPU-hours are used up")

    def _finish(self, job_id: str, status: RunStatus) -> None:
        self._usage_recorded.pop(job_id, None)
        self._close_dp_socket(job_id)
        destination = self.instance.settings.artifacts_dir / "jobs" / job_id / "outputs"
        collected = self.runner.collect(job_id, destination)
        # The trainer's weights and record, the gate over a free-form job's models, and the content checks
        # read whole files or run containers: outside any transaction, so they never hold the store's locks.
        outcome, collected = self._training_outcome(job_id, collected, status)
        checked = self._content_checks(job_id, collected)
        checked = self._gate(job_id, collected, checked)
        with self.context() as ctx:
            job = ctx.session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING.value:
                return
            if outcome is not None:
                training_runs.store_dp_run(ctx, job, outcome,
                                           policy=job_policy_body(ctx.session, job),
                                           artifacts=self.instance.settings.artifacts_dir)
            job.exit_code = status.exit_code
            job.usage = {**job.usage, **_usage(status, gpus=int(job.resources.get("gpus", 0)), earlier=job.usage)}
            _audit_usage(ctx, job)
            move(ctx, job, JobState.CHECKING, reason=_reason(status))
            self._check_outputs(ctx, job, collected, checked)
        self.runner.cleanup(job_id)

    def _lost(self, job_id: str, status: RunStatus) -> None:
        """The platform lost the job's run (its node went down): fail the job, or queue it again once where its
        policy allows (`runtime.on_node_loss: rerun_once`) and the lost run spent no privacy budget.

        The lost run's usage is audited once, and a rerun's running totals continue from it, so nothing is
        charged twice. A lost run that got DP answers or its training rows is never rerun: a second run would
        spend the budget again (the answers were charged; the rows are handed out once). A DP training job's
        reservation stays held across a rerun and is settled once, when the job ends.
        """
        self._usage_recorded.pop(job_id, None)
        self._close_dp_socket(job_id)  # first: no answer may be recorded for the lost run after the check below
        artifacts = self.instance.settings.artifacts_dir
        spent = bool(job_answers(platform_dir(artifacts, job_id))) or training_runs.rows_served(artifacts, job_id)
        # Removed before the store moves the job: a job queued again must find nothing of its lost run.
        self.runner.terminate(job_id)
        self.runner.cleanup(job_id)
        with self.context() as ctx:
            job = ctx.session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING.value:
                return
            usage = {**job.usage, **_usage(status, gpus=int(job.resources.get("gpus", 0)), earlier=job.usage)}
            lost_runs = int(float(usage.get("lost_runs", 0))) + 1
            policy = job_policy_body(ctx.session, job)
            allowed = policy["runtime"].get("on_node_loss", "fail") == "rerun_once"
            rerun = allowed and lost_runs == 1 and not spent
            job.usage = {**usage, "lost_runs": float(lost_runs)}
            if rerun:
                # What a rerun's totals start from (`_usage`): the lost run stays charged, and only once.
                job.usage = {**job.usage, **{f"lost_{key}": usage[key]
                                             for key in ("cpu_seconds", "gpu_seconds", "wall_seconds") if key in usage}}
            _audit_usage(ctx, job)
            ctx.record("job.run.lost", "job", job.id, reason=status.lost, run=lost_runs, rerun=rerun,
                       spent_budget=spent)
            if rerun:
                move(ctx, job, JobState.QUEUED, reason=f"queued again: its run was lost ({status.lost})")
                return
            why = ("" if not allowed else "; not run again: " + (
                "the run had spent privacy budget" if spent else "it was rerun once already"))
            move(ctx, job, JobState.FAILED, reason=f"{status.lost}{why}")

    def _training_outcome(self, job_id: str, collected: Collected,
                          status: RunStatus) -> tuple[training_runs.RunOutcome | None, Collected]:
        """A dp_training run's verified model and record, and the rest of what its container wrote (which
        leaves as nothing but logs: the trainer wipes /output before the rows arrive)."""
        with self.instance.read_session() as session:
            job = session.get(Job, job_id)
            if job is None or job.kind != JobKind.DP_TRAINING.value or job.state != JobState.RUNNING.value:
                return None, collected
        outcome = training_runs.finish_dp_run(self.instance, job_id, collected, status.exit_code)
        rest = [f for f in collected.files
                if f.path not in (RECORD_FILE, WEIGHTS_FILE)]
        return outcome, dataclasses.replace(collected, files=rest)

    def _gate(self, job_id: str, collected: Collected, checked: Checked) -> Checked:
        """The membership-inference gate's checks beside the content checks of a free-form job's models."""
        with self.instance.read_session() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.RUNNING.value:
                return checked
            policy = job_policy_body(session, job)
        found, report = training_runs.gate_results(self.instance, self.runner, job_id, buyer_files(collected),
                                                   policy)
        if not found:
            return checked
        with self.context() as ctx:  # the report, for the steward beside the files
            job = ctx.session.get(Job, job_id, with_for_update=True)
            if job is not None and job.state == JobState.RUNNING.value:
                job.training = {**(job.training or {}), "gate": report}
        content = dict(checked.content)
        for path, checks in found.items():
            content[path] = [*(content.get(path) or []), *checks]
        return dataclasses.replace(checked, content=content)

    def _content_checks(self, job_id: str, collected: Collected) -> Checked:
        """Leak scan of every text-like output, logs and names included, and the verified tables the job asked for."""
        artifacts = self.instance.settings.artifacts_dir
        with self.instance.read_session() as session:
            job = session.get(Job, job_id)
            if job is None:
                return Checked({}, None, [])
            dataset = get_dataset(session, job.dataset)
            version = get_version(session, job.dataset, job.dataset_version)
            policy = job_policy_body(session, job)
            card, parquet, number = dataset.card, artifacts / version.path, version.version
            earlier = earlier_releases(session, contract_id=job.contract_id, dataset=job.dataset, artifacts=artifacts)
            tier = job.tier
        index = ensure_fingerprints(artifacts, job.dataset, number, parquet, card)
        context = ContentContext(index=index, dataset_parquet=parquet, card=card, policy=policy)
        limit = int(float(policy["egress"]["max_file_mb"]) * 1024 * 1024)
        files = [("logs/stdout.txt", collected.stdout, True), ("logs/stderr.txt", collected.stderr, True)]
        own = buyer_files(collected)
        files += [(f.path, f, False) for f in own]
        contents = {path: f.stored_at.read_bytes() for path, f, _ in files if f.size <= limit}
        results: dict[str, list[CheckResult] | None] = {}
        for path, file, is_log in files:
            if path not in contents:
                continue  # over the size cap: blocked whatever it says
            facts = _facts(path, file, is_log=is_log)
            kind, _ = detect_kind(facts)
            results[path] = content_checks(facts, kind, contents[path], context, provenance=sidecar(contents, path))
        names = [f.path for f in own] + list(collected.refused)
        leak_scan = policy["egress"]["leak_scan"]
        verdict, reason = leak_verdict(index.scan("\n".join(names).encode()), block_rows=int(leak_scan["block_rows"]),
                                       block_ids=int(leak_scan["block_ids"]))
        name_scan = CheckResult("name-scan", Verdict.BLOCK if verdict == "block" else Verdict.PASS,
                                f"the job's output names: {reason}")
        tables = verified_tables(spec_files(collected), tier=tier, policy=policy, card=card, parquet=parquet,
                                 earlier=earlier)
        return Checked(results, name_scan, tables)

    def _check_outputs(self, ctx: Context, job: Job, collected: Collected, checked: Checked) -> None:
        policy = job_policy_body(ctx.session, job)
        declared = _declared_kinds(collected)
        facts: list[OutputFacts] = []
        stored: dict[str, CollectedFile] = {}
        content = dict(checked.content)
        for log_name, log_file in (("logs/stdout.txt", collected.stdout), ("logs/stderr.txt", collected.stderr)):
            facts.append(_facts(log_name, log_file, is_log=True))
            stored[log_name] = log_file
        for file in buyer_files(collected):
            # A name that cannot stand (hidden, reserved, odd characters) is listed under a neutral one.
            problem = name_problem(file.path)
            path = file.path if problem is None else withheld_name(file.path)
            if problem is not None:
                content[path] = [*(content.pop(file.path, None) or []), problem]
            if job.kind == JobKind.DP_TRAINING.value:
                content[path] = [*(content.get(path) or []), CheckResult(
                    "dp-training-output", Verdict.BLOCK, "a dp_training job releases only the model and record "
                    "the platform's trainer wrote; nothing else of its container leaves")]
            facts.append(_facts(path, file, declared_kind=declared.get(file.path)))
            stored[path] = file
        for path, why in collected.refused.items():
            facts.append(OutputFacts(path=withheld_name(path), size=0, head=b"", refused_reason=why))
        artifacts = self.instance.settings.artifacts_dir
        decisions = route_outputs(facts, policy=policy, tier=job.tier, content=content, names=checked.names)
        for decision in decisions:
            file_ = stored.get(decision.path)
            ctx.session.add(JobOutput(
                job_id=job.id, path=decision.path, size=file_.size if file_ else 0,
                sha256=file_.sha256 if file_ else "", kind=decision.kind.value, verdict=decision.verdict.value,
                checks=[c.as_dict() for c in decision.checks], status=decision.status.value,
                origin=(Origin.LOG if decision.path in LOG_PATHS else Origin.BUYER).value,
                stored_path=str(file_.stored_at.relative_to(artifacts)) if file_ else None,
            ))
        ctx.session.flush()
        held = any(c.rule == "leak-quarantine" for d in decisions for c in d.checks)
        store_verified_tables(ctx.session, job, checked.tables, policy=policy, held=held, artifacts=artifacts)
        store_dp_answers(ctx.session, job, policy=policy, artifacts=artifacts)
        ctx.session.refresh(job)
        ctx.record("job.outputs.checked", "job", job.id,
                   outputs={o.path: o.status for o in job.outputs},
                   bytes_released=sum(o.size for o in job.outputs if o.status == OutputStatus.RELEASED.value))
        sign_manifest(job, self.instance.signing_key)
        move(ctx, job, JobState.IN_REVIEW)
        settle_review(ctx, job)

    # DP sockets -----------------------------------------------------------------------------------

    def _open_dp_socket(self, job: Job, *, queries: bool = True) -> Path:
        """Serve DP queries for `job` on its own socket, under the job's contract and the same ledger;
        a dp_training job's socket also hands its trainer the rows (once) and takes its progress."""
        path = dp_socket_path(self.instance, job.id)
        job_id = job.id
        record = platform_dir(self.instance.settings.artifacts_dir, job_id)
        with self.instance.read_session() as session:
            card = get_dataset(session, job.dataset).card

        def keep_record(request: QueryRequest, answer: dict[str, Any]) -> None:
            # The platform keeps its own record of what it answered: that record, not a file the job
            # writes, is what leaves as the job's DP results.
            record_job_answer(record, platform_answer(request.sql, answer, card))

        handle = socket_handler(self.instance, job_id=job_id, org=job.buyer_org, contract=job.contract_id,
                                dataset=job.dataset, via=f"job:{job_id}", on_answer=keep_record) if queries else None
        more = (training_runs.socket_routes(self.instance, job_id, self.context)
                if job.kind == JobKind.DP_TRAINING.value else None)
        with self._dp_lock:
            existing = self._dp_sockets.pop(job_id, None)
            if existing is not None:
                existing.close()
            self._dp_sockets[job_id] = DpSocket(path, handle, more)
        return path

    def _reopen_dp_socket(self, job_id: str) -> None:
        # After a restart the running job's folder is still mounted; a new socket in it is reachable.
        with self._dp_lock:
            if job_id in self._dp_sockets:
                return
        if not dp_socket_path(self.instance, job_id).parent.is_dir():
            return
        with self.instance.read_session() as session:
            job = session.get(Job, job_id)
            contract = session.get(Contract, job.contract_id) if job is not None else None
            if job is not None and contract is not None:
                self._open_dp_socket(job, queries=JobKind.QUERY.value in contract.kinds)

    def _close_dp_socket(self, job_id: str) -> None:
        with self._dp_lock:
            served = self._dp_sockets.pop(job_id, None)
        if served is not None:
            served.close()
        folder = dp_socket_path(self.instance, job_id).parent
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    # Admission ------------------------------------------------------------------------------------

    def admit(self) -> list[Future[None]]:
        busy = self._busy_jobs()
        with self.instance.read_session() as session:
            running = list(session.execute(select(Job).where(Job.state == JobState.RUNNING.value)).scalars())
            queued = list(session.execute(select(Job).where(Job.state == JobState.QUEUED.value)).scalars())
            caps = {c.id: int(c.quotas.get("concurrent_jobs", 1)) for c in session.execute(
                select(Contract).where(Contract.id.in_({j.contract_id for j in queued}))).scalars()}
        # Jobs being launched right now hold their resources already.
        holding = running + [j for j in queued if j.id in busy]
        cpus = sum(float(j.resources["cpus"]) for j in holding)
        memory = sum(int(j.resources["memory_mb"]) for j in holding)
        gpus = sum(int(j.resources.get("gpus", 0)) for j in holding)
        per_contract: dict[str, int] = defaultdict(int)
        for job in holding:
            per_contract[job.contract_id] += 1
        futures = []
        for job in fair_order([j for j in queued if j.id not in busy], holding):
            need_cpus, need_memory = float(job.resources["cpus"]), int(job.resources["memory_mb"])
            need_gpus = int(job.resources.get("gpus", 0))
            if per_contract[job.contract_id] >= caps.get(job.contract_id, 1):
                continue
            if cpus + need_cpus > self.capacity.cpus or memory + need_memory > self.capacity.memory_mb:
                continue
            if gpus + need_gpus > self.capacity.gpus:
                continue
            future = self._in_background(job.id, partial(self._launch, job.id))
            if future is not None:
                futures.append(future)
                cpus += need_cpus
                memory += need_memory
                gpus += need_gpus
                per_contract[job.contract_id] += 1
        return futures

    def _launch(self, job_id: str) -> bool:
        # A training job's files from the rows are written before the transaction: reading a version
        # must not hold the job's lock.
        refused: str | None = None
        try:
            prepared = training_runs.prepare_run(self.instance, job_id)
        except Invalid as exc:  # the job cannot run as asked (a collection changed, images too large...)
            prepared, refused = None, "; ".join([exc.detail, *exc.errors])
        if refused is None:
            # Walking a collection's folder takes a while: not under the job's lock either.
            with self.instance.read_session() as session:
                queued = session.get(Job, job_id)
                problems = collection_problems(self.instance, queued, session) if queued is not None else []
            if problems:
                refused = not_mounted(problems)
        with self.context() as ctx:
            job = ctx.session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.QUEUED.value:
                return False
            if refused is not None:
                move(ctx, job, JobState.FAILED, reason=f"could not start: {refused}")
                return False
            if prepared:
                job.training = {**(job.training or {}), **prepared}
            contract = ctx.session.get(Contract, job.contract_id)
            if contract is None or contract.revoked_at is not None or contract.valid_until < datetime.now(UTC):
                move(ctx, job, JobState.CANCELLED, reason="the contract was revoked or expired before the job ran")
                return False
            if not job.image_id and not self._pin_image(ctx, job):
                return False
            allows_queries = JobKind.QUERY.value in contract.kinds
            needs_socket = allows_queries or job.kind == JobKind.DP_TRAINING.value
            dp_socket = self._open_dp_socket(job, queries=allows_queries) if needs_socket else None
            definition = job_definition(self.instance, job, dp_socket=dp_socket, session=ctx.session)
        try:
            self.runner.prepare(definition)
            self.runner.start(definition)
        except Exception as exc:  # a runner failure fails this job, not the worker
            self.runner.cleanup(job_id)
            self._close_dp_socket(job_id)
            with self.context() as ctx:
                job = ctx.session.get(Job, job_id, with_for_update=True)
                if job is not None and job.state == JobState.QUEUED.value:
                    move(ctx, job, JobState.FAILED, reason=f"could not start: {exc}")
            return False
        with self.context() as ctx:
            job = ctx.session.get(Job, job_id, with_for_update=True)
            if job is not None and job.state == JobState.QUEUED.value:
                move(ctx, job, JobState.RUNNING)
        return True


    @staticmethod
    def _pin_image(ctx: Context, job: Job) -> bool:
        """A job admitted before its image was published runs on the first image the workers publish."""
        record = ctx.session.get(ImageRecord, job.image)
        if record is None:
            return False
        job.image_id, job.reason = record.image_id, ""
        ctx.record("job.image.pin", "job", job.id, image=job.image, image_id=record.image_id)
        return True


def _audit_usage(ctx: Context, job: Job) -> None:
    """The job's CPU and GPU seconds so far on the audit chain, where invoices read them (`sandbox.billing`).

    Recorded once its run ends (a running total, so recording it again adds nothing), not at each of the
    worker's frequent usage writes, which would flood the chain.
    """
    ctx.record("job.usage", "job", job.id, **{key: job.usage[key] for key in ("cpu_seconds", "gpu_seconds")
                                               if key in job.usage})


def _usage(status: RunStatus, *, gpus: int = 0, earlier: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The job's usage so far: this run's, plus what its lost runs used (`lost_*`, kept in `earlier`)."""
    before = earlier or {}
    wall = 0.0
    if status.started_at:
        wall = max((status.finished_at or time.time()) - status.started_at, 0.0)
    usage = {"cpu_seconds": round(float(before.get("lost_cpu_seconds", 0.0)) + status.cpu_seconds, 3),
             "wall_seconds": round(float(before.get("lost_wall_seconds", 0.0)) + wall, 3),
             "peak_memory_bytes": float(status.peak_memory_bytes)}
    if gpus:
        # A GPU is held whole for the job's wall time, busy or not.
        usage["gpu_seconds"] = round(float(before.get("lost_gpu_seconds", 0.0)) + gpus * wall, 3)
    if status.usage_estimated:
        # No engine measured it: wall time x the CPUs reserved (runners.swarm without the node's engine).
        usage["cpu_seconds_estimated"] = 1.0
    return usage


def _reason(status: RunStatus) -> str:
    if status.timed_out:
        return "timeout: the job ran past its time limit and was killed"
    if status.oom_killed:
        return "oom: the job ran out of memory and was killed"
    if status.output_full:
        return f"quota: /output filled its quota (exit code {status.exit_code})"
    return f"exit code {status.exit_code}"


def _facts(path: str, file: CollectedFile, *, is_log: bool = False, declared_kind: str | None = None) -> OutputFacts:
    with file.stored_at.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    return OutputFacts(path=path, size=file.size, head=head, is_log=is_log, declared_kind=declared_kind)


def _declared_kinds(collected: Collected) -> dict[str, str]:
    for file in collected.files:
        if file.path == "manifest.json" and file.size < 1_000_000:
            try:
                document = json.loads(file.stored_at.read_text())
            except (ValueError, UnicodeDecodeError):
                return {}
            if isinstance(document, dict):
                files = document.get("files", document)
                if isinstance(files, dict):
                    return {str(k): str(v.get("kind") if isinstance(v, dict) else v) for k, v in files.items()}
    return {}
