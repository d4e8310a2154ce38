"""Catalog endpoints: stewards register datasets and versions; everyone reads the public card."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from sandbox.api import schemas
from sandbox.api.deps import AnyRole, InstanceDep, Steward
from sandbox.api.uploads import receive_multipart
from sandbox.auth.tokens import Role
from sandbox.catalog import service
from sandbox.catalog.cards import DatasetCard
from sandbox.errors import Invalid
from sandbox.worker_socket import LONG_TIMEOUT_S, ask_worker, principal_body, require_worker

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=schemas.DatasetView, response_model_exclude_unset=True)
def create_dataset(card: DatasetCard, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        dataset = service.create_dataset(ctx, card)
        return service.dataset_view(dataset, steward=True)


@router.get("", response_model=list[schemas.DatasetView],
            responses={304: {"description": "Not modified: the catalog still has the ETag given in If-None-Match"}})
def list_datasets(request: Request, instance: InstanceDep, principal: AnyRole) -> Response:
    with instance.read_session() as session:
        steward_of = principal.org if principal.role is Role.STEWARD else None
        body, etag = service.catalog_listing(session, steward_of=steward_of)
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get("/{name}", response_model=schemas.DatasetView, response_model_exclude_unset=True)
def get_dataset(name: str, instance: InstanceDep, principal: AnyRole) -> dict[str, Any]:
    with instance.read_session() as session:
        dataset = service.get_dataset(session, name)
        return service.dataset_view(dataset, steward=service.steward_view_for(principal, dataset))


@router.post("/{name}/versions", status_code=201, response_model=schemas.DatasetVersionView,
             response_model_exclude_unset=True)
async def add_version(name: str, request: Request, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    """Stage the upload, then let the worker read, check and store it: this process opens no dataset file."""
    settings = instance.settings
    with instance.read_session() as session:
        # Before the body is read: another org's steward uploads nothing (404, as for a missing name).
        service.owned_dataset(session, name, steward)
    require_worker(instance, what="registering a version")
    upload = await receive_multipart(request, file_fields={"file"}, staging_dir=settings.tmp_dir,
                                     max_file_bytes=settings.max_upload_bytes)
    try:
        if "file" not in upload.files:
            raise Invalid("the upload needs a part named 'file'")
        uploaded = upload.files["file"]
        # The worker also warms the new version up (leak-scan fingerprints, the DP ranked copy).
        return await run_in_threadpool(
            ask_worker, instance, "/datasets/versions",
            {"principal": principal_body(steward), "dataset": name, "upload": str(uploaded.path),
             "filename": uploaded.filename, "upload_sha256": uploaded.sha256, "size_bytes": uploaded.size},
            timeout_s=LONG_TIMEOUT_S, what="registering a version")
    finally:
        upload.discard()
