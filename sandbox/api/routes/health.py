"""Liveness (no token) and Prometheus metrics (a token of an admin, auditor or steward)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from sandbox.api import schemas
from sandbox.api.deps import InstanceDep, MetricsReader

router = APIRouter()


@router.get("/healthz", response_model=schemas.Health, response_model_exclude_unset=True)
def healthz(instance: InstanceDep) -> dict[str, str]:
    with instance.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/metrics", response_class=Response,
            responses=schemas.text_answer(CONTENT_TYPE_LATEST, "Prometheus text exposition"))
def metrics(request: Request, _reader: MetricsReader) -> Response:
    """Route counters say how many approvals, reviews and refusals happen, so outsiders get none
    of them (review 11.17); scrape with `Authorization: Bearer <token>`."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
