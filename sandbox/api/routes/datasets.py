"""Catalog endpoints: stewards register datasets and versions; everyone reads the public card."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from sandbox.api.deps import AnyRole, InstanceDep, Steward
from sandbox.api.uploads import receive_multipart
from sandbox.auth.tokens import Role
from sandbox.catalog import service
from sandbox.catalog.cards import DatasetCard
from sandbox.dp import queries
from sandbox.egress.content import ensure_fingerprints
from sandbox.errors import Invalid
from sandbox.instance import Instance
from sandbox.logs import get_logger

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
log = get_logger("sandbox.catalog")


@router.post("", status_code=201)
def create_dataset(card: DatasetCard, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        dataset = service.create_dataset(ctx, card)
        return service.dataset_view(dataset, steward=True)


@router.get("")
def list_datasets(request: Request, instance: InstanceDep, principal: AnyRole) -> Response:
    with instance.read_session() as session:
        steward_of = principal.org if principal.role is Role.STEWARD else None
        body, etag = service.catalog_listing(session, steward_of=steward_of)
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get("/{name}")
def get_dataset(name: str, instance: InstanceDep, principal: AnyRole) -> dict[str, Any]:
    with instance.read_session() as session:
        dataset = service.get_dataset(session, name)
        return service.dataset_view(dataset, steward=service.steward_view_for(principal, dataset))


@router.post("/{name}/versions", status_code=201)
async def add_version(name: str, request: Request, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    settings = instance.settings
    with instance.read_session() as session:
        # Before the body is read: another org's steward uploads nothing (404, as for a missing name).
        card = service.card_of(service.owned_dataset(session, name, steward))
    upload = await receive_multipart(request, file_fields={"file"}, staging_dir=settings.tmp_dir,
                                     max_file_bytes=settings.max_upload_bytes)
    try:
        if "file" not in upload.files:
            raise Invalid("the upload needs a part named 'file'")
        uploaded = upload.files["file"]
        staged, ingested, sha256 = await run_in_threadpool(
            service.prepare_version, settings.tmp_dir, card, uploaded.path, uploaded.filename
        )
    finally:
        upload.discard()
    try:
        with instance.context(steward) as ctx:
            version = service.add_version(ctx, name=name, staged=staged, ingested=ingested, sha256=sha256,
                                          upload_sha256=uploaded.sha256, size_bytes=uploaded.size)
            view = service.version_view(version, steward=True)
    finally:
        staged.unlink(missing_ok=True)
    # Fingerprints for the leak scan and the DP ranked copy: built now, not on the first job or query.
    threading.Thread(target=_warm_up, args=(instance, name, view["version"]), daemon=True).start()
    return view


def _warm_up(instance: Instance, name: str, version: int) -> None:
    """Build what each new version needs before its first use: the leak-scan fingerprints and the
    ranked copy for DP bounding. A failure only means the first job or query builds it."""
    try:
        with instance.read_session() as session:
            card = service.get_dataset(session, name).card
            parquet = instance.settings.artifacts_dir / service.get_version(session, name, version).path
        ensure_fingerprints(instance.settings.artifacts_dir, name, version, parquet, card)
        queries.warm_up(instance, name, version)
    except Exception as exc:
        log.warning("version_warm_up_failed", dataset=name, version=version, error=str(exc))
