"""Liveness (no token; a steward's or admin's token adds the workers and their GPUs) and Prometheus
metrics (a token of an admin, auditor or steward)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select, text

from sandbox.api import schemas
from sandbox.api.deps import InstanceDep, MetricsReader, get_principal
from sandbox.auth.tokens import Role
from sandbox.jobs.service import LIVE_WORKER_S
from sandbox.leader import elects_leader, scheduler_view
from sandbox.store.models import WorkerRecord

router = APIRouter()


@router.get("/healthz", response_model=schemas.Health, response_model_exclude_unset=True)
def healthz(request: Request, instance: InstanceDep) -> dict[str, Any]:
    """`{"status": "ok"}`; with a steward's or an admin's token, also each worker and its GPUs. A token that
    does not verify is refused (401), as everywhere; probes send none."""
    with instance.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    if "authorization" not in request.headers:
        return {"status": "ok"}
    principal = get_principal(request, instance)
    if principal.role not in (Role.STEWARD, Role.ADMIN):
        return {"status": "ok"}
    live_since = datetime.now(UTC) - timedelta(seconds=LIVE_WORKER_S)
    with instance.read_session() as session:
        workers = session.execute(select(WorkerRecord).order_by(WorkerRecord.id)).scalars().all()
    details: dict[str, Any] = {"workers": [
        {"id": worker.id, "host": worker.host, "live": worker.seen_at >= live_since,
         "seen_at": worker.seen_at.isoformat(), "cpus": worker.cpus, "memory_mb": worker.memory_mb,
         "gpus": worker.gpus, "gpu_names": [str(name) for name in worker.gpu_names or []]}
        for worker in workers]}
    if elects_leader(instance.settings):
        view = scheduler_view(instance.engine, instance.instance_id)
        details["scheduler"] = {"leader": view.leader, "standbys": view.standbys}
    return {"status": "ok", "details": details}


@router.get("/metrics", response_class=Response,
            responses=schemas.text_answer(CONTENT_TYPE_LATEST, "Prometheus text exposition"))
def metrics(request: Request, _reader: MetricsReader) -> Response:
    """Route counters say how many approvals, reviews and refusals happen, so outsiders get none
    of them (review 11.17); scrape with `Authorization: Bearer <token>`."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
