"""The notebook server process's view of its session: the store, the policy, the kernel runner, the filter.

One `Runtime` per server process, built by the server's `main()` from the spec the worker wrote and handed
to the Jupyter parts that need it (kernel manager, provisioner, websocket bridge, contents manager)
through their traitlets config (`server.server_config`). Audit events from the message path go through
the session's audit writer (`audit.SessionAudit`), in order and with group commit.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from concurrent.futures import Future
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select

from runners.base import KernelRunner
from sandbox.auth.tokens import Principal
from sandbox.catalog.service import get_dataset, get_version
from sandbox.config import Settings
from sandbox.contracts import JobKind, Use, usability_problems
from sandbox.dp.queries import QueryRequest, job_principal, socket_handler
from sandbox.dp.socket_server import DpSocket
from sandbox.instance import Instance
from sandbox.jobs.service import usage_totals
from sandbox.notebooks.jupyter.audit import SessionAudit
from sandbox.notebooks.jupyter.egress import Held, MessageFilter, NotebookRules
from sandbox.notebooks.jupyter.verified import SessionOutputs
from sandbox.notebooks.spec import SessionSpec, notebook_settings
from sandbox.policies import get_policy_version
from sandbox.release.status import Origin, OutputStatus
from sandbox.store.models import Contract, Job, JobOutput

log = structlog.get_logger(__name__)

EXPORTS = "exports/"  # where exported workspace files sit among the session's outputs


class Runtime:
    """The session's collaborators in the server process: built once, shared by every Jupyter part."""

    def __init__(self, spec: SessionSpec, *, instance: Instance | None = None,
                 kernels: KernelRunner | None = None) -> None:
        self.spec = spec
        self.instance = instance or Instance(Settings(**spec.settings))
        self._kernels = kernels
        self.audit = SessionAudit(self.instance, job_id=spec.job, principal=self.principal)
        self._dp_sockets: dict[str, DpSocket] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> Runtime:
        # traitlets deep-copies each config value it assigns: a collaborator is shared, never copied.
        return self

    # -- facts -----------------------------------------------------------------------------------

    @cached_property
    def policy(self) -> dict[str, Any]:
        name, _, version = self.spec.policy.partition("@")
        with self.instance.read_session() as session:
            return dict(get_policy_version(session, name, int(version)).body)

    @cached_property
    def notebook_settings(self) -> dict[str, Any]:
        return notebook_settings(self.policy)

    @property
    def kernels(self) -> KernelRunner:
        """Where the session's kernels run (the worker's runner, `runners.kernels`)."""
        if self._kernels is None:
            raise RuntimeError("this notebook runtime was built without a kernel runner")
        return self._kernels

    @cached_property
    def facts(self) -> tuple[dict[str, Any], Path]:
        """The dataset's card and the host path of the version the session reads."""
        spec = self.spec
        with self.instance.read_session() as session:
            card = dict(get_dataset(session, spec.dataset).card)
            relative = get_version(session, spec.dataset, spec.version).path
        return card, self.instance.settings.artifacts_dir / relative

    @cached_property
    def outputs(self) -> SessionOutputs:
        """Verified tables and recorded DP answers: what an aggregate kernel may show."""
        card, parquet = self.facts
        return SessionOutputs(self.instance, self.spec, self.principal, card=card, dataset_parquet=parquet,
                              sdc=dict(self.policy["egress"]["sdc"]))

    @cached_property
    def message_filter(self) -> MessageFilter:
        return MessageFilter(NotebookRules.from_policy(self.policy, self.spec.tier),
                             platform=self.outputs if self.spec.tier == "aggregate" else None,
                             signing_key=self._signing_key())

    def _signing_key(self) -> bytes:
        """The session's key for marking outputs as the platform's own; kept outside the workspace."""
        path = self.session_dir / "platform.key"
        with self._lock:
            if not path.exists():
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(secrets.token_bytes(32))
            return path.read_bytes()

    @property
    def session_dir(self) -> Path:
        """The session's host folder: the workspace is inside it, and kernels see only the workspace."""
        return Path(self.spec.workspace).parent

    def kernel_refusal(self) -> str | None:
        """Why no new kernel may start now, or None."""
        spec = self.spec
        with self.instance.read_context(self.principal) as ctx:
            contract = ctx.session.get(Contract, spec.contract)
            job = ctx.session.get(Job, spec.job)
            if contract is None or job is None:
                return "the notebook session is gone"
            if job.state != "running":
                return f"the notebook session is {job.state}"
            problems = usability_problems(contract, Use(kind=JobKind.NOTEBOOK, dataset=spec.dataset, org=spec.org))
            if problems:
                return "; ".join(problems)
            quota_s = float(contract.quotas.get("cpu_hours", 0)) * 3600
            if usage_totals(ctx, contract.id)["cpu_seconds"] >= quota_s:
                return f"contract {contract.id} has used its {contract.quotas.get('cpu_hours')} CPU-hours"
        limit = int(self.notebook_settings["max_kernels_per_contract"])
        running = self.kernels.kernels(contract=spec.contract)
        if len(running) >= limit:
            return f"contract {spec.contract} already runs {len(running)} kernel(s), its policy's limit"
        return None

    @property
    def principal(self) -> Principal:
        return job_principal(self.spec.job, self.spec.org)

    # -- DP sockets ------------------------------------------------------------------------------

    def open_dp_socket(self, kernel: str, path: Path) -> None:
        """Serve the kernel's DP queries at `path`, under the session's contract and the same ledger."""
        spec = self.spec
        on_answer = None
        if spec.tier == "aggregate":
            def on_answer(request: QueryRequest, answer: dict[str, Any]) -> None:
                # The kernel may display this id; the browser then sees the platform's record of the answer.
                answer["answer_id"] = self.outputs.record_dp_answer(request.sql, answer)

        handle = socket_handler(self.instance, job_id=spec.job, org=spec.org, contract=spec.contract,
                                dataset=spec.dataset, via=f"notebook:{spec.job}:{kernel}", on_answer=on_answer)
        with self._lock:
            previous = self._dp_sockets.pop(kernel, None)
            if previous is not None:
                previous.close()
            self._dp_sockets[kernel] = DpSocket(path, handle)

    def close_dp_socket(self, kernel: str) -> None:
        with self._lock:
            served = self._dp_sockets.pop(kernel, None)
        if served is not None:
            served.close()

    # -- the store -------------------------------------------------------------------------------

    def record(self, action: str, **details: Any) -> None:
        """Queue an audit event about this session (`SessionAudit.record`)."""
        self.audit.record(action, **details)

    def record_before_release(self, action: str, **details: Any) -> Future[None]:
        """Queue an audit event; completes once it has committed (`SessionAudit.record_before_release`)."""
        return self.audit.record_before_release(action, **details)

    def flush(self, timeout_s: float = 10.0) -> None:
        self.audit.flush(timeout_s)

    def add_usage(self, *, cpu_seconds: float, wall_seconds: float, kernel: str) -> None:
        with self.instance.context(self.principal) as ctx:
            job = ctx.session.get(Job, self.spec.job, with_for_update=True)
            if job is None:
                return
            usage = dict(job.usage or {})
            usage["cpu_seconds"] = float(usage.get("cpu_seconds", 0.0)) + cpu_seconds
            usage["wall_seconds"] = float(usage.get("wall_seconds", 0.0)) + wall_seconds
            usage["kernels"] = int(usage.get("kernels", 0)) + 1
            job.usage = usage
            ctx.record("notebook.kernel.usage", "job", job.id, kernel=kernel, cpu_seconds=round(cpu_seconds, 3),
                       wall_seconds=round(wall_seconds, 3))

    def released_exports(self) -> dict[str, str]:
        """Workspace files a steward released through an export: workspace path -> sha256 of what was released."""
        with self.instance.read_session() as session:
            outputs = session.execute(select(JobOutput.path, JobOutput.sha256).where(
                JobOutput.job_id == self.spec.job, JobOutput.status == "released",
                JobOutput.path.startswith(EXPORTS))).all()
        return {path[len(EXPORTS):]: digest for path, digest in outputs}

    def hold(self, items: list[Held], *, cell: str | None) -> None:
        """Store outputs the filter withheld as files of the session that wait for a steward's review."""
        if not items:
            return
        folder = self.instance.settings.artifacts_dir / "jobs" / self.spec.job / "outputs" / "held"
        folder.mkdir(parents=True, exist_ok=True)
        with self.instance.context(self.principal) as ctx:
            job = ctx.session.get(Job, self.spec.job, with_for_update=True)
            if job is None:
                return
            taken = {o.path for o in job.outputs}
            for item in items:
                path = _unique(f"held/{item.name}", taken)
                taken.add(path)
                stored = folder / Path(path).name
                stored.write_bytes(item.data)
                digest = hashlib.sha256(item.data).hexdigest()
                ctx.session.add(JobOutput(
                    job_id=job.id, path=path, size=len(item.data), sha256=digest, kind=_kind(item.mime),
                    verdict="review", checks=[{"rule": rule, "verdict": "review",
                                               "reason": f"a notebook output withheld for review by {rule}"}
                                              for rule in item.rules],
                    status=OutputStatus.IN_REVIEW.value, origin=Origin.BUYER.value,
                    stored_path=str(stored.relative_to(self.instance.settings.artifacts_dir)),
                ))
                ctx.record("notebook.output.held", "job", job.id, path=path, sha256=digest, size=len(item.data),
                           mime=item.mime, rules=list(item.rules), cell=cell)
            job.updated_at = datetime.now(UTC)

    def close(self) -> None:
        """Close the kernels' DP sockets, then write the audit events still queued."""
        with self._lock:
            sockets = list(self._dp_sockets.values())
            self._dp_sockets.clear()
        for served in sockets:
            served.close()
        self.audit.close()


def _unique(path: str, taken: set[str]) -> str:
    if path not in taken:
        return path
    stem, dot, suffix = path.rpartition(".")
    number = 2
    while f"{stem}-{number}{dot}{suffix}" in taken:
        number += 1
    return f"{stem}-{number}{dot}{suffix}"


def _kind(mime: str) -> str:
    if mime.startswith("image/") or mime == "application/pdf":
        return "figure"
    if mime in ("text/html", "application/json", "text/csv"):
        return "table"
    return "text"

